"""A Dramatiq app for memwarden's end-to-end tests, run by the real ``dramatiq`` CLI.

Configured by env: ``MWT_BROKER`` (``redis`` or ``rabbitmq``), ``MWT_BROKER_URL``,
``MWT_QUEUE``, ``MWT_NAMESPACE`` (Redis broker keys), ``MWT_HEARTBEAT_MS`` (Redis broker
heartbeat timeout, with maintenance on every command or ``MWT_MAINTENANCE`` per million;
unset: Dramatiq's defaults),
``MWT_REDIS_URL`` (completions and poison counts), ``MWT_PREFIX`` (completion keys).
memwarden's own settings come from ``MEMWARDEN_*``.

One actor, ``mw_job(job_id, kind, mb, io_ms)``; every run counts ``{prefix}:runs[job_id]`` and
every completion adds ``job_id`` to ``{prefix}:done``. Kinds: ``light``; ``leak`` (keeps
``mb`` MiB for good); ``buffers`` (keeps ``mb`` MiB as one big buffer, mmap'd);
``fragment`` (glibc fragmentation of ``mb`` MiB); ``hog`` (keeps ``mb`` MiB, then waits to
be killed, up to a minute); ``hog_once`` (a hog on its first run only); ``grow`` (keeps
``mb`` MiB more every 0.1 s, without bound, until killed); ``spike`` (takes ``mb`` MiB
in 10 MiB buffers at 200 MiB/s, holds them for ``io_ms``, then frees them). ``io_ms`` is
otherwise the job's own I/O before it allocates.
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis

from memwarden import workload
from memwarden.dramatiq import MemoryWarden

QUEUE = os.environ["MWT_QUEUE"]
PREFIX = os.environ["MWT_PREFIX"]
REDIS_URL = os.environ["MWT_REDIS_URL"]
store = redis.Redis.from_url(REDIS_URL)
BIG: list[bytearray] = []  # what ``buffers`` keeps

if os.environ["MWT_BROKER"] == "redis":
    from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker

    quick = os.environ.get("MWT_HEARTBEAT_MS")
    chance = int(os.environ.get("MWT_MAINTENANCE", MAINTENANCE_SCALE))
    options = (
        # Quick redelivery after a hard kill (the defaults are 60 s and 0.1% of commands).
        {"heartbeat_timeout": int(quick), "maintenance_chance": chance} if quick else {}
    )
    broker: dramatiq.Broker = RedisBroker(
        url=os.environ["MWT_BROKER_URL"], namespace=os.environ["MWT_NAMESPACE"], **options
    )
    broker.add_middleware(MemoryWarden())
else:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=os.environ["MWT_BROKER_URL"])
    broker.add_middleware(MemoryWarden(poison_url=REDIS_URL))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="mw_job", max_retries=0)
def mw_job(job_id: str, kind: str = "light", mb: float = 0, io_ms: int = 0) -> None:
    run = store.hincrby(f"{PREFIX}:runs", job_id, 1)
    if kind == "spike":  # big buffers, 200 MiB/s up to mb MiB, held for io_ms, then freed
        bufs = []
        for _ in range(max(1, int(mb) // 10)):
            bufs.append(bytearray(b"\x06") * (10 * workload.MB))
            time.sleep(0.05)
        time.sleep(io_ms / 1000)
        del bufs
        io_ms = 0
    time.sleep(io_ms / 1000)  # the job's own I/O, where a test wants a realistic pace
    if kind == "leak":
        workload.leak(mb)
    elif kind == "buffers":
        BIG.append(bytearray(b"\x05") * int(mb * workload.MB))
    elif kind == "fragment":
        workload.fragment(int(mb), threads=2)
    elif kind == "grow":
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the warden should kill us long before
            workload.leak(mb)
            time.sleep(0.1)
    elif kind == "hog" or (kind == "hog_once" and run == 1):
        workload.leak(mb)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the watchdog should kill us long before
            time.sleep(0.05)
    store.sadd(f"{PREFIX}:done", job_id)
