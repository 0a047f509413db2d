"""The gate between Celery's consumer and its pool (the worker's main process): intake
open, paused or closed; under threads/solo also the tasks running."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.worker import state as worker_state

from memwarden.integrations.celery.common import log

#: Event-loop wake-up period (celery#6941; also how soon the loop acts on a pause).
WAKE_EVERY = 0.1

OPEN, PAUSED, CLOSED = "open", "paused", "closed"


class Intake:
    """The gate between Celery's consumer and its pool, in the worker's main process.

    ``open``: tasks are fetched and started. ``paused`` (memory over the soft limit): the
    consumer fetches nothing, a task handed to the pool but not started goes back to the
    broker instead of starting (threads, solo: prefork's pool keeps what it was handed),
    running tasks go on. ``closed`` (a drain or a kill): the same, for good.

    Under threads/solo it also knows the tasks running: started at ``task_prerun``, finished
    once Celery has stored their outcome. Every start and end passes :attr:`turnstile`; a
    kill takes it for good (:meth:`freeze`), so the tasks it counts are exactly those running
    at that instant, and none starts or ends after it. The consumer is touched only from
    its event loop's thread (:meth:`sync`, run soon after each change and every
    ``WAKE_EVERY``). On Redis the fetch stops at once: the channel sends no new ``BRPOP``
    while intake is not open, and a pending one is ended (``CLIENT UNBLOCK``).

    A broker reconnect gives Celery's consumer a new connection, channel and task consumer,
    which Celery starts consuming at once: :meth:`reattach` gates the new ones before it
    does, so a paused worker's new task consumer starts only once intake opens again."""

    def __init__(self) -> None:
        self.state = OPEN
        self.turnstile = threading.Lock()
        self.consumer: Any = None
        self.in_task = False  # solo: the event loop's thread is running a task
        self._mutex = threading.Lock()  # state, waiting, returns: held for moments only
        self._waiting: dict[int, Any] = {}  # id(request) -> request: handed over, unstarted
        self._returns: list[Any] = []  # requests to give back, from the loop's thread
        self._running: dict[Any, str] = {}  # task id -> name
        self._stopped: Any = None  # the task consumer we stopped, to start again
        self._synced_at = 0.0  # monotonic time of the last sync: the loop is alive
        self._redis: Any = None  # Redis broker: a client of our own, for CLIENT UNBLOCK
        self.channel: Any = None  # Redis broker: the consumer's channel
        self._fetcher: tuple[Any, int | None] | None = None  # fetching connection, client id
        self._loop_thread: int | None = None  # ident of the event loop's (consumer's) thread

    # ------------------------------------------------------------ wiring
    def attach(self, consumer: Any, pool: str, redis_client: Any = None) -> None:
        """Put the gate between ``consumer`` and its pool, and on the Redis broker
        (``redis_client``) between the channel and its fetch (at ``worker_ready``)."""
        self.consumer = consumer
        self._redis = redis_client
        self._loop_thread = threading.get_ident()
        self._restore_on_loop(consumer)
        self._gate_task_consumer(consumer.task_consumer)
        tasks_pool = consumer.pool
        if pool == "threads":
            tasks_pool.on_apply = self._threads_apply(tasks_pool.executor)
        elif pool == "solo":
            tasks_pool.on_apply = self._solo_apply
        else:  # prefork (or another pool): its own queue; only what comes in is gated
            tasks_pool.on_apply = self._gated_apply(tasks_pool.on_apply)

    def reattach(self, consumer: Any) -> None:
        """The consumer has started again (a broker reconnect; from its thread, before its
        event loop starts consuming): gate its new task consumer and channel. Nothing
        before the first :meth:`attach`."""
        if self.consumer is None:
            return
        self.consumer = consumer
        self._loop_thread = threading.get_ident()
        self._restore_on_loop(consumer)
        self._stopped = None  # the old task consumer is gone
        self._fetcher = None
        with self._mutex:
            # Handed to the pool before the loss, waiting for a slot: from the old channel,
            # which can acknowledge nothing; the broker delivers them again (it put back all
            # the old connection held). Run now, each would run twice.
            stale, self._waiting = len(self._waiting), {}
        self._gate_task_consumer(consumer.task_consumer)
        log.info("memwarden: broker reconnected; intake %s", self.state)
        if stale:
            log.info(
                "memwarden: %d task(s) from the lost connection not started: the "
                "broker delivers them again",
                stale,
            )

    def _restore_on_loop(self, consumer: Any) -> None:
        """Celery's prefetch restore after a reconnect runs on the event loop's thread.

        A consumer that reconnects while tasks run lowers its prefetch count, and raises it
        back as tasks are acknowledged: chained on each acknowledgement, so it runs in the
        thread that acknowledges, which under the threads pool is the task's own. The raise
        is an AMQP ``basic.qos`` call that waits for its reply by reading the connection's
        socket, which the event loop reads too: one reads the other's reply (the pool thread
        then blocks in ``recv``; the loop's next call, our pause's ``basic.cancel`` or
        resume's ``basic.consume``, waits for a reply already read) or half a frame (the
        reader left with the other half takes its bytes for a frame size and waits for
        them), and the worker fetches nothing until the broker drops the connection (30 s
        and more). Called off the loop's thread, the restore is handed to it."""
        name = "_restore_prefetch_count_after_connection_restart"
        restore = getattr(consumer, name, None)
        if restore is None or name in vars(consumer):
            return  # not this Celery, or handed over already

        def on_loop(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._loop_thread:
                return restore(*args, **kwargs)
            return consumer.call_soon(restore, *args, **kwargs)

        setattr(consumer, name, on_loop)

    def _gate_task_consumer(self, task_consumer: Any) -> None:
        """Gate a task consumer (and on Redis its channel's fetch)."""
        if task_consumer is None:
            return
        if self._redis is not None:
            with contextlib.suppress(AttributeError):
                self._gate_fetch(task_consumer.channel)
        self._gate_consume(task_consumer)

    def _gate_consume(self, task_consumer: Any) -> None:
        """Celery's event loop starts its task consumer at every (re)start: while intake is
        not open that start is put off until :meth:`sync` opens it (on RabbitMQ a start
        would have the broker push messages at once)."""
        consume = task_consumer.consume

        def gated(*args: Any, **kwargs: Any) -> Any:
            if self.state is OPEN:
                return consume(*args, **kwargs)
            self._stopped = task_consumer  # started by sync once intake is open
            return None

        task_consumer.consume = gated

    def _gate_fetch(self, channel: Any) -> None:
        """kombu's Redis channel asks ``qos.can_consume()`` before each ``BRPOP`` and before
        reading its socket: no new fetch while intake is not open, a pending one is read.
        Once the consumer is stopped (no queue active, so no fetch can start) the socket is
        read too: readable then, it was closed by the server, and left unread the event
        loop would spin on it and never reconnect."""
        self.channel = channel
        qos = channel.qos
        can_consume = qos.can_consume

        def gated() -> bool:
            fetching = (
                self.state is OPEN
                or bool(getattr(channel, "_in_poll", None))
                or not getattr(channel, "active_queues", True)
            )
            return fetching and bool(can_consume())

        qos.can_consume = gated

    def _threads_apply(self, executor: Any) -> Callable[..., Any]:
        """The threads pool's ``on_apply``: a task starts when a thread takes it, if still
        wanted then."""

        def on_apply(
            target: Any,
            args: Any = None,
            kwargs: Any = None,
            callback: Any = None,
            accept_callback: Any = None,
            **_: Any,
        ) -> Any:
            request = request_of(accept_callback)
            if not self._admit(request):
                return None
            run = (self._start, request, target, args, kwargs, callback, accept_callback)
            return ApplyResult(executor.submit(*run))

        return on_apply

    def _solo_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **_: Any,
    ) -> None:
        """The solo pool's ``on_apply``: the task runs at once, in the loop's own thread."""
        request = request_of(accept_callback)
        if self._admit(request):
            self.in_task = True  # no fetch is pending while it runs
            try:
                self._start(request, target, args, kwargs, callback, accept_callback)
            finally:
                self.in_task = False

    def _gated_apply(self, handed: Callable[..., Any]) -> Callable[..., Any]:
        """Another pool's ``on_apply`` (prefork), given back what comes while not open."""

        def on_apply(target: Any, args: Any = None, kwargs: Any = None, **opts: Any) -> Any:
            request = request_of(opts.get("accept_callback"))
            if request is not None and self.state is not OPEN:
                self._give_back([request])
                self._free_slot()
                return None
            return handed(target, args, kwargs, **opts)

        return on_apply

    def _free_slot(self) -> None:
        """Prefork: Celery took a pool slot (its worker's semaphore) for a task before
        handing it to the pool, and frees it when the task's result comes back. A task given
        back never runs: its slot is freed here, or the pool is left one slot short for
        good (with all of them gone, the worker takes nothing ever again)."""
        controller = getattr(self.consumer, "controller", None)
        semaphore = getattr(controller, "semaphore", None)
        takes_slots = getattr(controller, "process_task", None) == getattr(
            controller, "_process_task_sem", None
        )
        if semaphore is not None and takes_slots:
            semaphore.release()  # may hand the slot to a waiting task (given back too)

    def _admit(self, request: Any) -> bool:
        """A task handed to the pool (loop thread): kept for its start, or given back."""
        if request is None:
            return True
        with self._mutex:
            if self.state is OPEN:
                self._waiting[id(request)] = request
                return True
        self._give_back([request])
        return False

    def _start(
        self,
        request: Any,
        target: Any,
        args: Any,
        kwargs: Any,
        callback: Any,
        accept_callback: Any,
    ) -> None:
        """Start a task the pool has a slot for — unless given back meanwhile, or intake is
        no longer open (then it goes back now)."""
        if request is not None:
            with self._mutex:
                held = self._waiting.pop(id(request), None)
                if held is None:
                    return  # given back already
                if self.state is not OPEN:
                    self._returns.append(held)
                    held = None
            if held is None:
                self._soon()
                return
        apply_target(target, args, kwargs, callback, accept_callback)

    def _give_back(self, requests: list[Any]) -> None:
        with self._mutex:
            self._returns.extend(requests)
        self._soon()

    def _soon(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.call_soon(self.sync)

    # ------------------------------------------------------------ the warden's calls
    def pause(self) -> None:
        """Stop fetching; what the pool holds unstarted goes back to the broker."""
        self._shut(PAUSED)

    def resume(self) -> None:
        """Fetch again after :meth:`pause` (never after a drain or a kill)."""
        with self._mutex:
            if self.state is not PAUSED:
                return
            self.state = OPEN
        self._soon()

    def close(self) -> None:
        """For good (a drain, a kill): as :meth:`pause`, never resumed."""
        self._shut(CLOSED)

    def _shut(self, state: str) -> None:
        with self._mutex:
            if self.state is CLOSED or self.state == state:
                return
            self.state = state
            self._returns.extend(self._waiting.values())
            self._waiting.clear()
        self._soon()
        self._unblock()

    def _unblock(self) -> None:
        """End the channel's pending ``BRPOP``, if any (Redis)."""
        pending = getattr(self.channel, "_in_poll", None)
        if self._redis is None or pending is None:
            return
        known = self._fetcher
        client_id = known[1] if known is not None and known[0] is pending else None
        with contextlib.suppress(Exception):
            if client_id is None:
                client_id = redis_client_id(self._redis, pending)
            if client_id is not None:
                self._redis.client_unblock(client_id)

    def _know_fetcher(self) -> None:
        """Learn the Redis client id of the channel's fetching connection ahead of need
        (loop thread), so that a pause ends its ``BRPOP`` in one round trip."""
        pending = getattr(self.channel, "_in_poll", None)
        if self._redis is None or pending is None:
            return
        if self._fetcher is None or self._fetcher[0] is not pending:
            client_id = None  # not found (a proxy between): unblocked by a full lookup
            with contextlib.suppress(Exception):
                client_id = redis_client_id(self._redis, pending)
            self._fetcher = (pending, client_id)

    def settle(self, limit: float) -> bool:
        """Intake not open: wait (at most ``limit`` s, and only while the event loop runs)
        until the consumer has stopped and no fetch of its is pending — whatever a pending
        one brought is given back meanwhile. True once settled."""
        deadline = time.monotonic() + limit
        unblocked_at = time.monotonic()
        while not self.fetch_settled():
            now = time.monotonic()
            if now > deadline or now - self._synced_at > 3 * WAKE_EVERY:
                return False  # out of time, or the loop has stopped (a warm shutdown)
            if now - unblocked_at > 0.1:
                unblocked_at = now
                self._unblock()
            time.sleep(0.002)
        return True

    def freeze(self) -> list[dict[str, Any]]:
        """At a kill (threads, solo): intake closed, and no task starts or ends from now on
        (the turnstile is kept); returns the tasks running at this instant."""
        self.close()
        self.turnstile.acquire()
        return self.running()

    # ------------------------------------------------------------ tasks (threads, solo)
    def started(self, task_id: Any, name: str) -> None:
        with self.turnstile:
            self._running[task_id] = name

    def finished(self, task_id: Any) -> None:
        with self.turnstile:
            self._running.pop(task_id, None)

    def running(self) -> list[dict[str, Any]]:
        """The tasks started and not finished (threads, solo)."""
        for _ in range(5):
            with contextlib.suppress(RuntimeError):  # changed size: another thread
                return [{"job": n, "job_id": i} for i, n in list(self._running.items())]
        return []

    # ------------------------------------------------------------ the loop's thread
    def sync(self) -> None:
        """Bring the consumer in line with the state, and give back what is due (from the
        event loop's thread only: kombu's channels are not thread-safe)."""
        self._synced_at = time.monotonic()
        with self._mutex:
            returns, self._returns = self._returns, []
            state = self.state
        given = 0
        for request in returns:
            with contextlib.suppress(Exception):
                if not request.acknowledged:
                    request.reject(requeue=True)
                    given += 1
            worker_state.task_ready(request)
        if given:
            log.info("memwarden: %d task(s) not started went back to the queue", given)
        self._know_fetcher()
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if task_consumer is None:
            return
        if state is not OPEN and consuming(task_consumer):
            task_consumer.cancel()
            self._stopped = task_consumer
        elif state is OPEN and self._stopped is task_consumer:
            self._stopped = None
            task_consumer.consume()

    def fetch_settled(self) -> bool:
        """True once the consumer has stopped and no fetch of its is pending (then nothing
        more can arrive). A task the loop's thread is running (solo) means no fetch is."""
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if self.in_task:
            return True
        if task_consumer is not None and consuming(task_consumer):
            return False
        return not getattr(self.channel, "_in_poll", None)


def consuming(task_consumer: Any) -> bool:
    """Whether a kombu consumer is consuming from any of its queues."""
    return any(task_consumer.consuming_from(q) for q in task_consumer.queues)


def request_of(accept_callback: Any) -> Any:
    """The Celery request a pool is handed (its ``on_accepted`` method's owner), or None."""
    request = getattr(accept_callback, "__self__", None)
    return request if hasattr(request, "reject") and hasattr(request, "acknowledged") else None


def redis_client_id(redis_client: Any, connection: Any) -> int | None:
    """The Redis server's id for a redis-py ``connection`` of this process (matched by
    its socket's address in ``CLIENT LIST``), or None."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        return None
    host, port = sock.getsockname()[:2]
    for client in redis_client.client_list():
        if client.get("addr") in (f"{host}:{port}", f"[{host}]:{port}"):
            return int(client["id"])
    return None
