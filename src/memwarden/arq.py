"""``memwarden.arq.guard(WorkerSettings, **options)``: see :mod:`memwarden.integrations.arq`."""

from memwarden.integrations.arq import ArqGuard, guard

__all__ = ["ArqGuard", "guard"]
