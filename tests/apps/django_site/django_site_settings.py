"""Settings of memwarden's test Django project: its own PostgreSQL database (named by
``DJANGO_TEST_DB``), the database task backend, and memwarden guarding ``db_worker``."""

import json
import os

SECRET_KEY = "memwarden-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django_tasks", "django_tasks_db", "memwarden.django", "django_jobs"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DJANGO_TEST_DB", "memwarden_django"),
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }
}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
#: memwarden's settings, as a project writes them (the tests give them as JSON); a key here
#: wins over its MEMWARDEN_* variable.
MEMWARDEN: dict[str, object] = json.loads(os.environ.get("DJANGO_TEST_MEMWARDEN", "{}"))
LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"memwarden": {"handlers": ["console"], "level": "INFO"}},
}
