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

from twisted.application.internet import backoffPolicy

from ..config import Tuning
from ..constants import StreamState

#: Delay before the second attempt; each later one doubles it.
BACKOFF_BASE = 0.5

#: Longest delay between two attempts.
BACKOFF_CAP = 15.0


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RECONNECTING = "reconnecting"
    ERROR = "error"


def health_of(state: StreamState) -> Health:
    """
    A stream's health follows from its state; it is not kept beside it.
    """
    return _HEALTH.get(state, Health.HEALTHY)


_HEALTH = {
    StreamState.UNHEALTHY: Health.UNHEALTHY,
    StreamState.RECONNECTING: Health.RECONNECTING,
    StreamState.ERROR: Health.ERROR,
}


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


def reconnect_delays(random: Callable[[], float]) -> Callable[[int], float]:
    """
    Seconds to wait before reconnection attempt C{n}: the first at once,
    then Twisted's exponential backoff from L{BACKOFF_BASE}, doubling up to
    L{BACKOFF_CAP}, plus up to half a base of jitter drawn from C{random}
    (a float in [0, 1)).
    """
    policy = backoffPolicy(
        initialDelay=BACKOFF_BASE,
        maxDelay=BACKOFF_CAP,
        factor=2.0,
        jitter=lambda: random() * BACKOFF_BASE / 2,
    )
    return lambda attempt: policy(attempt - 1) if attempt else 0.0


def check_interval(tuning: Tuning) -> float:
    """
    How often a stream's silence is judged: often enough to notice it
    within a small fraction of C{no_data_timeout}.
    """
    return min(1.0, tuning.no_data_timeout / 4)
