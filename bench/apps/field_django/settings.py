"""Settings of the field matrix's Django project (``DJANGO_SETTINGS_MODULE``)."""

import os

SECRET_KEY = "memwarden-field"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django_tasks", "django_tasks_db", "memwarden.django", "field_django"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("FIELD_DJANGO_DB", "memwarden_field"),
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "5432",
    }
}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"memwarden": {"handlers": ["console"], "level": "INFO"}},
}
