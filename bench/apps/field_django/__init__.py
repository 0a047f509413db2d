"""The Django project of ``bench/field.py``: Django Tasks' database backend on a PostgreSQL
database of the cell's own (``FIELD_DJANGO_DB``), ``db_worker`` guarded by memwarden
(``memwarden.django`` in ``INSTALLED_APPS``, default settings from ``MEMWARDEN_*``)."""
