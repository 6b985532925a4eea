"""Durations and sizes as users write them: one parser each, for the CLI's options and for saga
definitions alike.

A duration is a number of seconds, or a number with a unit: ``250ms``, ``30s``, ``5m``, ``1h``,
``7d`` (decimals allowed: ``1.5h``; spaces around the unit allowed). A size is a number of bytes,
or a whole number with a binary unit: ``512K``, ``100M``, ``2G``, ``1T`` (``KiB``, ``MB``, ``kb``
... all mean powers of 1024). Both must be more than 0: a time limit or a size limit of 0 is a
typo, not a limit. A time limit is at most 7 days (``MAX_DURATION``); an age (``saga gc
--older-than``) may be 0 and has no upper bound (``zero=True, maximum=None``).

Errors are ``ValueError``s whose message says what was wrong (with examples, or the value it got);
callers prefix the option or key and turn them into their own errors (click.BadParameter, a
definition's problem).
"""

import math
import re

MAX_DURATION = 7 * 86400  # seconds: the daemon's limit for step/saga timeouts and compensate_timeout

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"\s*(\d+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*")
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(value, *, zero: bool = False, maximum: float | None = MAX_DURATION) -> float:
    """Seconds of *value*: a number (int or float: seconds) or a string such as ``"30s"``.
    Raises ValueError unless it is more than 0 (at least 0 with *zero*) and at most *maximum*."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a duration (seconds, or a string like 30s, 5m, 1h, 7d, 250ms)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (examples: 30s, 5m, 1h, 7d, 250ms)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"{value!r} is not a duration (seconds, or a string like 5m)")
    if not math.isfinite(seconds):
        raise ValueError(f"must be finite (got {value!r})")
    if seconds < 0 or (seconds == 0 and not zero):
        raise ValueError(f"must be {'at least' if zero else 'more than'} 0 (got {value!r})")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"must be at most {format_duration(maximum)} (got {value!r})")
    return seconds


def parse_size(value) -> int:
    """Bytes of *value*: an int (bytes) or a string such as ``"100M"``. Raises ValueError unless
    it is more than 0."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a size (bytes, or a string like 100M, 2G)")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if not m:
            raise ValueError(f"{value!r} is not a size (examples: 4096, 512K, 100M, 2G)")
        n = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b")[0].lower()]
    else:
        raise ValueError(f"{value!r} is not a size (bytes, or a string like 100M)")
    if n <= 0:
        raise ValueError(f"must be more than 0 (got {value!r})")
    return n


def format_duration(seconds: float) -> str:
    """The shortest exact spelling among d, h, m, s (``7d``, ``90s``, ``0.25s``)."""
    for unit in ("d", "h", "m"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds:g}s"
