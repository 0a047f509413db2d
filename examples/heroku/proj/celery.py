"""A Celery app guarded by memwarden; its settings come from MEMWARDEN_* config vars."""

import os
import ssl

from celery import Celery

import memwarden.celery

REDIS_URL = os.environ["REDIS_URL"]

app = Celery("proj", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_acks_late=True,  # ack when done: a task of a killed worker is delivered again
    task_reject_on_worker_lost=True,  # a killed pool child's task goes back, not to FAILED
    worker_prefetch_multiplier=1,  # a drain cannot take back tasks already prefetched
    broker_transport_options={"visibility_timeout": 3600},  # > your longest task
)
TLS = REDIS_URL.startswith("rediss://")  # Heroku Redis: TLS, a self-signed certificate
if TLS:
    app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
    app.conf.redis_backend_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}

# Settings: the MEMWARDEN_* config vars (app.json). Poison-job counts live in this Redis.
memwarden.celery.guard(app, poison_url=f"{REDIS_URL}?ssl_cert_reqs=none" if TLS else None)


@app.task
def resize(path: str, width: int) -> str:
    """A stand-in for your own tasks."""
    return f"{path}@{width}"
