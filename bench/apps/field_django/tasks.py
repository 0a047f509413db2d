"""The one task of the field matrix's Django project: ``field_job`` runs the shared job."""

import field_jobs

try:
    from django.tasks import task  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from django_tasks import task  # type: ignore[no-redef,unused-ignore]


@task()
def field_job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> None:
    field_jobs.run(job_id, kind, mb, secs)
