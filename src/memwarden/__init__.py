"""memwarden: keep background-job workers inside their memory quota without losing a job."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (``memwarden diagnose`` needs none of them)
    from memwarden.config import Config
    from memwarden.hooks import Hooks
    from memwarden.journal import Journal
    from memwarden.policy import Action, Decision, Limits, Policy
    from memwarden.units import SettingError
    from memwarden.warden import Warden

__version__ = "0.1.0"
#: public name -> the module that defines it
_HOMES = {
    "Action": "memwarden.policy",
    "Config": "memwarden.config",
    "Decision": "memwarden.policy",
    "Hooks": "memwarden.hooks",
    "Journal": "memwarden.journal",
    "Limits": "memwarden.policy",
    "Policy": "memwarden.policy",
    "SettingError": "memwarden.units",
    "Warden": "memwarden.warden",
}
__all__ = [
    "Action",
    "Config",
    "Decision",
    "Hooks",
    "Journal",
    "Limits",
    "Policy",
    "SettingError",
    "Warden",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'memwarden' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
