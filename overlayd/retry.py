"""Retrying with exponential back-off: the one schedule of the daemon's compensation attempts and
of a definition run's step and compensation attempts.

Attempt n (1-based) that fails is followed, unless it was the last, by a pause of
``BACKOFF * 2**(n-1)`` seconds, at most ``CAP``: 0.5 s, 1 s, 2 s ... 30 s. ``OVERLAYD_BACKOFF``
sets BACKOFF (the tests make it 0.01); it is read at each call, so a test's environment counts.

    for attempt, pause in retry.schedule(3):
        if try_it(attempt):
            break
        if pause is not None:
            time.sleep(pause)          # await trio.sleep(pause) on the event loop
"""

import os

DEFAULT_BACKOFF = 0.5
CAP = 30.0


def backoff() -> float:
    return float(os.environ.get("OVERLAYD_BACKOFF", DEFAULT_BACKOFF))


def delay(attempt: int) -> float:
    """Seconds to wait after failed attempt *attempt* (1-based) before the next one."""
    return min(backoff() * 2 ** (attempt - 1), CAP)


def schedule(attempts: int):
    """(attempt number, pause after it if it fails, None after the last) for 1..*attempts*."""
    for attempt in range(1, attempts + 1):
        yield attempt, (delay(attempt) if attempt < attempts else None)


def pauses_left(attempt: int, attempts: int) -> float:
    """The pauses still to come if attempt *attempt* and every later one fail: with each
    attempt's time limit, the latest moment a series of attempts can end."""
    return sum(delay(a) for a in range(attempt, attempts))
