"""
How a stream's health is judged and how its reconnections are paced.

No data from the engine for C{no_data_timeout} makes a stream unhealthy;
still none C{reconnect_after} later, it is reconnected.  A playback
connection that ends is reconnected at once.  Reconnection attempts after the
first back off exponentially, with jitter so that the streams of a failed
engine do not return to their engines in step.
"""

from enum import StrEnum
from typing import Callable

import attrs

from ..config import Tuning

#: Delay before the second attempt; each later one doubles it.
BACKOFF_BASE = 0.5

#: Longest delay between two attempts.
BACKOFF_CAP = 15.0


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RECONNECTING = "reconnecting"
    ERROR = "error"


class Verdict(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RECONNECT = "reconnect"


def judge_silence(silent: float, tuning: Tuning) -> Verdict:
    """
    What C{silent} seconds without data from the engine mean.
    """
    if silent >= tuning.no_data_timeout + tuning.reconnect_after:
        return Verdict.RECONNECT
    if silent >= tuning.no_data_timeout:
        return Verdict.UNHEALTHY
    return Verdict.HEALTHY


@attrs.frozen
class Backoff:
    """
    Delays between reconnection attempts: the first at once, then
    C{base * 2**(n-1)} capped at C{cap}, each scaled by a random factor in
    [0.5, 1) (the injectable C{random} returns a float in [0, 1)).
    """

    random: Callable[[], float]
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP

    def delay(self, attempt: int) -> float:
        if attempt == 0:
            return 0.0
        return min(self.cap, self.base * 2 ** (attempt - 1)) * (0.5 + self.random() / 2)


def check_interval(tuning: Tuning) -> float:
    """
    How often a stream's silence is judged: often enough to notice it
    within a small fraction of C{no_data_timeout}.
    """
    return min(1.0, tuning.no_data_timeout / 4)
