"""
A data source's attributes that its stream must hear of when they change
(its state, the engine session it holds), so that what the stream counts
in the worker's metrics moves at the change itself instead of being worked
out again on every scrape.
"""

import attrs


def watched(default=None):
    """
    An attrs field whose every assignment after construction is told to the
    source's C{on_change(source, name, value)}, before the value is set.
    """
    return attrs.field(default=default, on_setattr=_tell)


def _tell(source, attribute, value):
    on_change = source.on_change
    if on_change is not None:
        on_change(source, attribute.name, value)
    return value
