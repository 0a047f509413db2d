"""``memwarden.procrastinate.guard(app, **options)``: see
:mod:`memwarden.integrations.procrastinate`."""

from memwarden.integrations.procrastinate import ProcrastinateGuard, guard

__all__ = ["ProcrastinateGuard", "guard"]
