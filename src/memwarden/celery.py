"""``memwarden.celery.guard(app)``: the Celery integration (needs the ``celery`` extra)."""

from memwarden.integrations.celery import CeleryGuard, PoisonJobError, check_app, guard

__all__ = ["CeleryGuard", "PoisonJobError", "check_app", "guard"]
