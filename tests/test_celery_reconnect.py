"""Celery: a paused worker stays paused across a broker reconnect.

On a connection loss Celery's consumer clears the event loop's timers (``hub.timer.clear()``),
builds a new connection, channel and task consumer, and starts consuming again. memwarden's
intake gate must hold on the new ones: paused, the worker fetches nothing, whether the
connection dropped before the pause or during it; once memory is back under the soft limit,
every task runs.

Real ``celery worker`` (prefork) in a real memory cgroup, real Redis and RabbitMQ; the
connection loss is real too: the broker drops the worker's connections (Redis ``CLIENT
KILL``, ``rabbitmqctl close_connection``). The pause comes from a process in the worker's
cgroup that holds 300 MiB (as in :mod:`tests.test_celery_ladder`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import wait_for
from tests.test_celery_e2e import AMQP, RESULTS, Run
from tests.test_celery_e2e import run_factory as _run_factory
from tests.test_celery_ladder import HOLD_300_MIB, MiB, pause_run, started_at

run_factory = _run_factory  # the harness's fixture, here too

#: How long a paused worker is watched for a fetch once it has reconnected (a broken gate
#: fetches within milliseconds of the new consumer's start).
WATCH = 3.0
#: Reconnects while paused, each in a worker lifetime of its own (a second pause within
#: 30 s of a restart called off drains the worker instead), and the tasks then waiting.
LIFETIMES, BACKLOG = 6, 40
#: How long a resumed worker may take for its backlog: a second or two on a busy two-core
#: machine. A worker whose broker connection is wedged takes until the broker drops it
#: (30 s and more).
DELIVER = 20.0


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_clients(run: Run, pid: int) -> list[dict[str, Any]]:
    """The Redis server's view of process ``pid``'s connections."""
    ports = local_ports(pid)
    return [c for c in run.marks.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]


def rabbit_connections(pid: int) -> list[str]:
    """RabbitMQ's connection pids (``<rabbit@...>``) of process ``pid``'s connections."""
    ports = local_ports(pid)
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) in ports:
            found.append(fields[0])
    return found


def connected(run: Run) -> int:
    """How many times the worker's consumer has connected to its broker (Celery says so)."""
    return run.log.read_text(errors="replace").count("Connected to ")


def drop_connections(run: Run, pid: int) -> None:
    """The broker drops every connection of the worker's main process; waits until the
    consumer has connected again."""
    before = connected(run)
    if run.broker.startswith("redis"):
        clients = redis_clients(run, pid)
        assert clients, "the worker holds no Redis connection"
        for client in clients:
            run.marks.client_kill_filter(_id=client["id"])
    else:
        conns = wait_for(lambda: rabbit_connections(pid), 60, 0.5, "the worker's AMQP connection")
        for conn in conns:  # type: ignore[union-attr]
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", conn, "memwarden test: reconnect"],
                capture_output=True,
                timeout=60,
                check=True,
            )
    run.wait(lambda: connected(run) > before, 120, "the consumer to connect again")


def receipts(run: Run, task_id: str) -> list[float]:
    """When the worker received (fetched) the task, each time."""
    raw = run.marks.get(f"{run.name}:received:{task_id}") or b""
    return [float(t) for t in raw.decode().split()]


def fetching_stopped(run: Run, pid: int) -> bool:
    """The broker's view: the worker's consumer fetches nothing (RabbitMQ: no consumer on
    the queue; Redis: none of the worker's connections blocked in, or lately done with, a
    ``BRPOP``)."""
    if run.broker.startswith("redis"):
        # kombu's BRPOP times out after 1 s and is sent again while it consumes.
        return not [
            c
            for c in redis_clients(run, pid)
            if "b" in c["flags"] or (c["cmd"] == "brpop" and int(c["idle"]) < 3)
        ]
    return run.queued()[1] == 0


def watch_paused(run: Run, tasks: list[str], since: float) -> None:
    """For ``WATCH`` seconds, the worker fetches none of ``tasks`` (received after
    ``since``, the instant its fetching was seen stopped)."""
    deadline = time.monotonic() + WATCH
    while time.monotonic() < deadline:
        fetched = {t: r for t in tasks if (r := [x for x in receipts(run, t) if x > since])}
        assert not fetched, f"fetched while paused: {fetched}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
@pytest.mark.parametrize("broker_url", [RESULTS, AMQP], ids=["redis", "rabbitmq"])
def test_pause_holds_across_broker_reconnects(run_factory: Any, broker_url: str, pool: str) -> None:
    """A reconnect before the pause, and one during it: while paused the worker fetches
    nothing (a task it was running when the connection dropped comes back to the queue, and
    waits there too); resumed, every task completes."""
    run = pause_run(run_factory, broker_url, pool)
    with run.worker() as (sup, cg):
        pid = sup.starts[0]
        # 1. The connection drops while intake is open: the worker serves on.
        drop_connections(run, pid)
        first = run.send("mwt.tick", 1)
        run.wait(lambda: first in run.done(), 60, "a task after the first reconnect")
        waiter = run.send("mwt.wait_key", "go")  # runs across the pause and the reconnect
        run.wait(lambda: receipts(run, waiter), 60, "the waiter to start")
        hog = subprocess.Popen([sys.executable, "-c", HOLD_300_MIB], preexec_fn=cg.join)
        try:
            # 2. Paused: nothing is fetched.
            run.wait(lambda: run.records("pause"), 60, "the pause")
            run.wait(lambda: fetching_stopped(run, pid), 60, "the fetching to stop")
            stopped_at = time.time()
            ticks = [run.send("mwt.tick", 1) for _ in range(4)]
            watch_paused(run, ticks, stopped_at)
            # 3. The connection drops while paused: still nothing is fetched, not even the
            # waiter's message (back in the queue once its connection is gone).
            drop_connections(run, pid)
            watch_paused(run, [*ticks, waiter], stopped_at)
            assert fetching_stopped(run, pid), "fetching again while paused"
            assert not run.records("resume")
        finally:
            hog.kill()
            hog.wait()
        # The restart the hog's rise called for waits for the task in hand, and is called
        # off once it is done with memory back under the soft limit: intake resumes.
        run.marks.set(f"{run.name}:go", 1)
        run.wait(lambda: run.records("resume"), 60, "the resume")
        run.wait(lambda: {*ticks, waiter} <= run.done(), 90, "every task, once resumed")
        assert len(sup.starts) == 1
    resumed = run.records("resume")[0]["ts"]
    for task in ticks:
        assert all(t >= resumed for t in receipts(run, task)), "fetched before the resume"
    assert run.records("kill") == []


def runs(run: Run, task_id: str) -> int:
    """How many times ``mwt.tick`` ran ``task_id`` (its own count)."""
    return int(run.marks.hget(f"{run.name}:runs", task_id) or 0)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_reconnect_while_paused_stalls_nothing(run_factory: Any, pool: str) -> None:
    """RabbitMQ drops the connection of a paused worker running a task, with a backlog
    waiting. Celery reconnects with a lower prefetch count (tasks are running) and raises it
    back as tasks are acknowledged; memwarden resumes intake. The backlog then runs at once,
    each task once, on the connection the worker made — no second loss of it, no stall.

    (Under the threads pool Celery raised it from the task's thread: an AMQP call whose
    reply that thread read from the socket the event loop reads too; one took the other's
    reply or half a frame and the worker fetched nothing until the broker dropped the
    connection. :meth:`Intake._restore_on_loop` hands it to the loop's thread.) The race
    is lost in about half the reconnects: one per worker lifetime, ``LIFETIMES`` of them."""
    for lifetime in range(LIFETIMES):
        reconnect_while_paused(pause_run(run_factory, AMQP, pool), lifetime)


def reconnect_while_paused(run: Run, lifetime: int) -> None:
    """One worker lifetime of :func:`test_a_reconnect_while_paused_stalls_nothing`."""
    with run.worker() as (sup, cg):
        pid = sup.starts[0]
        waiter = run.send("mwt.wait_key", "go")
        run.wait(lambda: receipts(run, waiter), 60, "the waiter to start")
        hog = subprocess.Popen([sys.executable, "-c", HOLD_300_MIB], preexec_fn=cg.join)
        try:
            run.wait(lambda: run.records("pause"), 60, "the pause")
            run.wait(lambda: fetching_stopped(run, pid), 60, "the fetching to stop")
            ticks = [run.send("mwt.tick", 1) for _ in range(BACKLOG)]
            drop_connections(run, pid)  # a task running: a lower prefetch count
        finally:
            hog.kill()
            hog.wait()
        # The restart the hog's rise called for is called off once the waiter is done with
        # memory back under the soft limit (250 MB): intake resumes.
        under = lambda: cg.cgroup.read().working_set < 150 * MiB  # noqa: E731
        run.wait(under, 60, "the hog's memory to go")
        run.marks.set(f"{run.name}:go", 1)
        run.wait(lambda: run.records("resume"), 60, "the resume")
        run.wait(lambda: set(ticks) <= run.done(), DELIVER, f"the backlog (lifetime {lifetime})")
        run.wait(lambda: waiter in run.done(), 60, "the waiter")
        assert len(sup.starts) == 1
        assert connected(run) == 2, "the connection was lost again"
        for task in ticks:
            assert (len(receipts(run, task)), runs(run, task)) == (1, 1), task


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_reconnect_runs_each_waiting_task_once(run_factory: Any, pool: str) -> None:
    """Intake open again (after a pause), every slot busy and tasks fetched behind them,
    waiting for a slot: RabbitMQ drops the connection. It puts back every message the
    worker held; what was waiting for a slot runs once — from the new connection, not also
    from the old one (its acknowledgement would fail, "Couldn't ack")."""
    run = pause_run(run_factory, AMQP, pool)
    with run.worker() as (sup, _):
        pid = sup.starts[0]
        holders = [run.send("mwt.wait_key", "go") for _ in range(run.concurrency)]
        run.wait(lambda: all(started_at(run, h) for h in holders), 60, "the slots to be busy")
        ticks = [run.send("mwt.tick", 1) for _ in range(4)]
        fetched = lambda: all(receipts(run, t) for t in ticks)  # noqa: E731
        run.wait(fetched, 60, "the ticks to be fetched, waiting for a slot")
        drop_connections(run, pid)
        run.marks.set(f"{run.name}:go", 1)
        run.wait(lambda: {*holders, *ticks} <= run.done(), DELIVER, "every task")
        # The pool takes its tasks in order: once one sent after them has run, every copy
        # of theirs that the worker held has started (and counted its run).
        last = run.send("mwt.tick", 1)
        run.wait(lambda: last in run.done(), DELIVER, "a task sent after them")
        assert connected(run) == 2, "the connection was lost again"
        assert [runs(run, t) for t in ticks] == [1] * len(ticks)
