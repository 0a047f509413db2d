"""``"memwarden.django"`` in ``INSTALLED_APPS``: see :mod:`memwarden.integrations.django`."""

from memwarden.integrations.django import MemwardenConfig, Quarantined, check_settings, install

__all__ = ["MemwardenConfig", "Quarantined", "check_settings", "install"]
