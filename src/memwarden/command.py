"""For a worker run under ``memwarden run``: tell ``run`` where each job starts and ends.

``run`` sees only a process tree. A command that says where its jobs begin and end gets what
the in-process integrations have: per-job records for ``memwarden diagnose`` (which job kind
grows memory), the jobs in hand named in a kill record, and poison quarantine — a job in
flight at ``MEMWARDEN_POISON_KILLS`` hard kills is listed as quarantined, and the command
skips it instead of running it again::

    from memwarden import command

    def handle(job):
        if command.quarantined(job.id):
            command.skipped(job.id, job.kind)   # and park it where a human will look
            return
        with command.job(job.id, job.kind):
            job.run()

Outside ``memwarden run`` every call is a no-op. Nothing here ever raises into the job.
The process's RSS goes with a job's start and end: measured at the boundary, not when
``run`` reads the message (late, on a busy machine).

The protocol, for commands in other languages (``docs/run.md``; Sidekiq's middleware is in
``docs/sidekiq.md``): ``run`` puts a FIFO's path in ``MEMWARDEN_JOBS``; each message is one
line of at most :data:`MAX_LINE` bytes written in one ``write``, fields split by spaces::

    start <pid> <job id> <job kind> [<rss>]
    end <pid> <job id> [<rss>]
    skip <pid> <job id> <job kind>

``MEMWARDEN_QUARANTINE`` names a file that lists the quarantined job ids, one a line, and
``MEMWARDEN_SPOOL`` a private directory that outlives the command's lifetimes, for a command
whose broker loses a killed worker's jobs in hand (Sidekiq's basic fetch): keep a copy of each
job in hand there and put back what is left when the command starts. Ids and kinds are single
words: whitespace in them is replaced with ``_``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from memwarden.gauges.proc import self_rss

log = logging.getLogger("memwarden")

JOBS_ENV = "MEMWARDEN_JOBS"
QUARANTINE_ENV = "MEMWARDEN_QUARANTINE"
#: A private directory for copies of the jobs in hand, where the broker forgets a killed
#: worker's jobs: put back what is there when the command starts (``docs/run.md``).
SPOOL_ENV = "MEMWARDEN_SPOOL"
#: A message is written whole or not at all (a pipe's ``PIPE_BUF``).
MAX_LINE = 4096

_lock = threading.Lock()
_fd: int | None = None
_fd_pid = 0
_quarantine: tuple[tuple[int, int], frozenset[str]] = ((-1, -1), frozenset())


def word(value: Any) -> str:
    """``value`` as one word of a message (whitespace replaced; empty as ``-``)."""
    return "_".join(str(value).split()) or "-"


def _jobs_fd() -> int | None:
    """This process's write end of ``run``'s FIFO (opened again after a fork), or None."""
    global _fd, _fd_pid
    path = os.environ.get(JOBS_ENV)
    if not path:
        return None
    with _lock:
        if _fd is not None and _fd_pid == os.getpid():
            return _fd
        try:
            _fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # run is gone (ENXIO), or no FIFO there: say nothing more
            log.debug("memwarden: cannot tell run about jobs (%s): %s", path, exc.strerror)
            _fd = None
        _fd_pid = os.getpid()
        return _fd


def tell(verb: str, job_id: Any, kind: Any = None, rss: int | None = None) -> bool:
    """Send one message to ``run``; False when nobody listens or the FIFO is full."""
    fd = _jobs_fd()
    if fd is None:
        return False
    fields = [verb, str(os.getpid()), word(job_id)] + ([word(kind)] if kind is not None else [])
    fields += [str(rss)] if rss is not None else []
    line = (" ".join(fields)[: MAX_LINE - 1] + "\n").encode(errors="replace")
    try:
        return os.write(fd, line) == len(line)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EPIPE):
            log.debug("memwarden: cannot tell run about a job: %s", exc.strerror)
        return False


@contextlib.contextmanager
def job(job_id: Any, kind: Any) -> Iterator[None]:
    """``with command.job(id, kind):`` around one job: its start and end told to ``run``."""
    tell("start", job_id, kind, self_rss())
    try:
        yield
    finally:
        tell("end", job_id, rss=self_rss())


def skipped(job_id: Any, kind: Any = None) -> bool:
    """Tell ``run`` that a quarantined job was not run (it journals the quarantine)."""
    return tell("skip", job_id, kind if kind is not None else "-")


def quarantined(job_id: Any) -> bool:
    """Whether ``run`` has quarantined ``job_id`` (it was in flight at too many kills)."""
    global _quarantine
    path = os.environ.get(QUARANTINE_ENV)
    if not path:
        return False
    try:
        st = os.stat(path)
        version = (st.st_ino, st.st_mtime_ns)  # run replaces the file whole
        if version != _quarantine[0]:
            with open(path, encoding="utf-8", errors="replace") as fh:
                _quarantine = (version, frozenset(fh.read().split()))
    except OSError:
        return False
    return word(job_id) in _quarantine[1]
