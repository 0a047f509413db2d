"""``memwarden.huey.guard(huey, **options)``: see :mod:`memwarden.integrations.huey`."""

from memwarden.integrations.huey import HueyGuard, guard

__all__ = ["HueyGuard", "guard"]
