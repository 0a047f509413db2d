"""``globals().update(memwarden.gunicorn.hooks(**options))`` in ``gunicorn.conf.py``: see
:mod:`memwarden.integrations.gunicorn`."""

from memwarden.integrations.gunicorn import GunicornGuard, hooks

__all__ = ["GunicornGuard", "hooks"]
