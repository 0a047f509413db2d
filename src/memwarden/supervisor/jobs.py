"""``memwarden run``'s side of the job protocol (:mod:`memwarden.command`).

:class:`JobLedger` owns the FIFO the command writes to and the quarantine file it reads. It
keeps the jobs in hand (with the RSS of the process running each when it started), journals a
``job`` record at each end (what ``memwarden diagnose`` attributes growth by), names the jobs
in hand at a hard kill and counts the kill against each; a job in flight at ``poison_kills``
kills is journaled ``quarantine`` and listed in the quarantine file, and the command's
``skip`` of it is journaled ``skip``. Kill counts live as long as ``run`` does (every lifetime of
the command), not across a restart of ``run`` itself.

It also keeps a private spool directory (``MEMWARDEN_SPOOL``) where a command whose broker
forgets a killed worker's jobs (Sidekiq's basic fetch) keeps a copy of each job in hand, to put
back when it starts again. A spool left by a ``run`` that is gone is taken over by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from memwarden import state
from memwarden.command import JOBS_ENV, MAX_LINE, QUARANTINE_ENV, SPOOL_ENV
from memwarden.config import Config
from memwarden.gauges.proc import alive, rss
from memwarden.journal import Journal

log = logging.getLogger("memwarden.run")

#: Jobs kept in hand at most (a command that never says ``end`` cannot grow ``run``).
MAX_IN_HAND = 10_000


@dataclass
class InHand:
    kind: str
    pid: int
    t0: float  # monotonic
    rss_before: int


class JobLedger:
    """The jobs a command under ``run`` says it runs."""

    def __init__(self, directory: str, journal: Journal, poison_kills: int) -> None:
        tag = f"run-{os.getpid()}"
        self.fifo_path = os.path.join(directory, f"{tag}.jobs")
        self.quarantine_path = os.path.join(directory, f"{tag}.quarantine")
        self.spool = os.path.join(directory, f"{tag}.spool")
        self.journal = journal
        self.poison_kills = poison_kills
        self.fd = state.make_fifo(self.fifo_path)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        state.write_atomic(self.quarantine_path, "")
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        self._adopt_spools(directory)
        self.in_hand: dict[str, InHand] = {}
        self.kills: dict[str, int] = {}
        self.quarantined: dict[str, str] = {}  # id -> kind
        self.heard = False  # the command has said something: it knows the protocol
        self._partial = b""

    @classmethod
    def make(cls, config: Config, journal: Journal) -> JobLedger | None:
        """A ledger in the state directory, or None (said once) where it cannot be made."""
        try:
            return cls(config.state_path, journal, config.poison_kills)
        except OSError as exc:
            log.warning("memwarden run: no job protocol (%s): %s", exc.filename, exc.strerror)
            return None

    def env(self) -> dict[str, str]:
        """What the command's environment gets."""
        return {
            JOBS_ENV: self.fifo_path,
            QUARANTINE_ENV: self.quarantine_path,
            SPOOL_ENV: self.spool,
        }

    def _adopt_spools(self, directory: str) -> None:
        """Jobs spooled under a ``run`` that is gone (killed, or stopped with jobs in hand)
        move into ours: the command puts them back when it starts."""
        for old in glob.glob(os.path.join(directory, "run-*.spool")):
            pid = os.path.basename(old)[4:-6]
            if old == self.spool or not pid.isdigit() or alive(int(pid)):
                continue
            moved = 0
            for path in glob.glob(os.path.join(old, "*")):
                with contextlib.suppress(OSError):
                    os.replace(path, os.path.join(self.spool, os.path.basename(path)))
                    moved += 1
            shutil.rmtree(old, ignore_errors=True)
            for stale in (f"run-{pid}.jobs", f"run-{pid}.quarantine"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, stale))
            if moved:
                log.warning(
                    "memwarden run: %d job(s) in hand of an earlier run (pid %s) will be put "
                    "back on their queue",
                    moved,
                    pid,
                )

    # ------------------------------------------------------------- reading
    def read(self) -> None:
        """Take every whole message waiting in the FIFO."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("memwarden run: job FIFO: %s", exc.strerror)
                return
            if not data:
                return
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()[:MAX_LINE]
            for line in lines:
                self._take(line.decode(errors="replace").split())

    def _take(self, fields: list[str]) -> None:
        if len(fields) < 3 or not fields[1].isdigit():
            return  # not ours to judge: a message cut by a dying writer
        self.heard = True
        verb, pid, job_id = fields[0], int(fields[1]), fields[2]
        kind = fields[3] if len(fields) > 3 else "-"
        if verb == "start" and len(self.in_hand) < MAX_IN_HAND:
            rss = _told(fields, 4, pid)
            self.in_hand[job_id] = InHand(kind, pid, time.monotonic(), rss)
        elif verb == "end":
            self._ended(job_id, pid, _told(fields, 3, pid))
        elif verb == "skip":
            self.journal.write(
                "skip", job=self.quarantined.get(job_id, kind), job_id=job_id, pid=pid
            )
            log.warning("memwarden run: quarantined job %s (%s) skipped", job_id, kind)

    def _ended(self, job_id: str, pid: int, rss_after: int) -> None:
        started = self.in_hand.pop(job_id, None)
        if started is None:
            return
        self.journal.write(
            "job",
            job=started.kind,
            job_id=job_id,
            pid=pid,
            rss_before=started.rss_before,
            rss_after=rss_after,
            duration_s=round(time.monotonic() - started.t0, 6),
            framework="run",
        )

    # ------------------------------------------------------------- kills
    @property
    def busy(self) -> bool | None:
        """Whether a job is in hand; None before the command has said anything."""
        return bool(self.in_hand) if self.heard else None

    def in_flight(self) -> list[dict[str, Any]]:
        return [{"job": h.kind, "job_id": i} for i, h in self.in_hand.items()]

    def killed(self, in_flight: list[dict[str, Any]]) -> None:
        """Count a hard kill against each job in flight; quarantine those at the limit."""
        for entry in in_flight:
            job_id = entry["job_id"]
            count = self.kills[job_id] = self.kills.get(job_id, 0) + 1
            if count >= self.poison_kills and job_id not in self.quarantined:
                self.quarantined[job_id] = entry["job"]
                self.journal.write(
                    "quarantine", job=entry["job"], job_id=job_id, kills=count, framework="run"
                )
                log.error(
                    "memwarden run: job %s (%s) was running at %d hard kills: it is poison; "
                    "quarantined (the command skips it)",
                    job_id,
                    entry["job"],
                    count,
                )
                self._publish()

    def lifetime_ended(self) -> None:
        """The command's processes are gone: so are their jobs in hand."""
        self.read()
        self.in_hand.clear()

    def _publish(self) -> None:
        try:
            state.write_atomic(self.quarantine_path, "".join(f"{i}\n" for i in self.quarantined))
        except OSError as exc:
            log.error("memwarden run: cannot write the quarantine list: %s", exc.strerror)

    def close(self) -> None:
        """Remove the FIFO and the quarantine list; a spool still holding jobs stays for the
        next ``run`` to take over."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        for path in (self.fifo_path, self.quarantine_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.spool)  # only when empty


def _told(fields: list[str], at: int, pid: int) -> int:
    """The RSS the command measured at the boundary (field ``at``), else ``pid``'s now."""
    if len(fields) > at and fields[at].isdigit():
        return int(fields[at])
    return _rss(pid)


def _rss(pid: int) -> int:
    try:
        return rss(pid)
    except OSError:
        return 0
