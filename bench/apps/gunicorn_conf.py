"""``gunicorn -c gunicorn_conf.py``: memwarden's hooks, settings from ``MEMWARDEN_*``."""

from memwarden.gunicorn import hooks

globals().update(hooks())
