"""
Between Python values and Redis: replies as text, hashes as dicts, fields
as the flat lists HSET takes.
"""

from .base import Fields, _plain


def text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def pairs(flat: list) -> dict:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def flatten(fields: Fields) -> list:
    flat = []
    for name, value in _plain(fields).items():
        flat += [name, value if isinstance(value, (bytes, str)) else repr(value)]
    return flat
