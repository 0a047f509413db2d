"""Sizes and durations as people write them in config: ``512MB``, ``85%``, ``2m``.

A bare integer size is KiB: the convention of Sidekiq memory-killer middlewares'
``MAX_RSS`` and of Celery's ``worker_max_memory_per_child``. Decimal suffixes (``KB``,
``MB``, ``GB``) are powers of 1000, binary ones (``KiB``, ``MiB``, ``GiB``) powers of 1024,
as the SI and IEC say.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from memwarden import redact


class SettingError(ValueError):
    """A setting's value cannot be understood; the message names it and shows an example."""

    def __init__(
        self,
        setting: str,
        value: object,
        expected: str,
        example: str,
        *,
        example_setting: str | None = None,
    ) -> None:
        self.setting = setting
        shown = redact.value(value)
        named = example_setting or setting
        super().__init__(f"{setting}={shown!r}: {expected} (for example {named}={example})")


#: The largest size taken (1 EiB): anything above is a typo, and would overflow later.
MAX_SIZE = 1 << 60

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*%\s*$")
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_size(value: str | int | float, setting: str = "size", quota: int | None = None) -> int:
    """Bytes from ``512MB``, ``1.5GiB``, ``85%`` (of ``quota``) or a bare KiB integer."""
    example = "512MB"
    if isinstance(value, bool):
        raise SettingError(setting, value, "expected a size", example)
    if isinstance(value, int):
        if value < 0:
            raise SettingError(setting, value, "a size cannot be negative", example)
        return _bounded(value * 1024, setting, value)
    if isinstance(value, float):
        raise SettingError(setting, value, "give a size with a unit", example)
    text = str(value)
    percent = _PERCENT_RE.match(text)
    if percent:
        share = float(percent.group(1))
        if not 0 < share <= 1000:
            raise SettingError(setting, value, "a percentage must be above 0", "85%")
        if quota is None:
            raise SettingError(
                setting, value, "a percentage needs a known quota (set MEMWARDEN_QUOTA)", example
            )
        return int(quota * share / 100)
    match = _SIZE_RE.match(text)
    if not match:
        raise SettingError(setting, value, "expected a size such as 512MB, 1.5GiB or 85%", example)
    number, unit = match.group(1), match.group(2).lower()
    if unit == "":
        if "." in number:
            raise SettingError(setting, value, "a bare number is KiB and must be whole", "524288")
        return _bounded(int(number) * 1024, setting, value)
    if unit not in _SIZE_UNITS:
        raise SettingError(setting, value, f"unknown size unit {match.group(2)!r}", example)
    return _bounded(int(Fraction(number) * _SIZE_UNITS[unit]), setting, value)


def _bounded(size: int, setting: str, value: object) -> int:
    if size > MAX_SIZE:
        raise SettingError(setting, value, "too large to be a memory size", "512MB")
    return size


def parse_duration(value: str | int | float, setting: str = "duration") -> float:
    """Seconds from ``120``, ``90s``, ``2m``, ``1h`` or ``250ms``."""
    example = "2m"
    if isinstance(value, bool):
        raise SettingError(setting, value, "expected a duration", example)
    if isinstance(value, (int, float)):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise SettingError(setting, value, "a duration must be a finite number >= 0", example)
        return float(value)
    match = _DURATION_RE.match(str(value).lower())
    if not match or match.group(2) not in _DURATION_UNITS:
        raise SettingError(
            setting, value, "expected a duration such as 120, 90s, 2m or 1h", example
        )
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise SettingError(setting, value, "too long to be a duration", example)
    return seconds


def parse_bool(value: str | bool | int, setting: str = "flag") -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise SettingError(setting, value, "expected true or false", "true")


def format_size(n: int | float | None) -> str:
    """``1.5 GiB`` style, for people."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{sign}{value:.1f} GiB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12.5s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"
