"""memwarden: keep background-job workers inside their memory quota without losing a job."""

from memwarden.config import Config
from memwarden.journal import Journal
from memwarden.policy import Action, Decision, Limits, Policy
from memwarden.units import SettingError
from memwarden.warden import Hooks, Warden

__version__ = "0.1.0"
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
