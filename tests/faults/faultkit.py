"""Real faults for the issue-15 tests: another local user, a full or read-only disk.

- :func:`throwaway_user` makes a real user (``useradd``) for the length of a test and
  removes it after; :func:`as_user` runs a command as that user (``setpriv``).
- :func:`sticky_dir` is a world-writable sticky directory like ``/tmp``, for ``TMPDIR``, so
  a test never touches the machine's own ``/tmp/memwarden-<uid>``.
- :func:`tmpfs` mounts a small tmpfs (full in a moment, or read-only) and unmounts it.
- :func:`run_victim` runs ``victim.py``: a real worker process with an in-process warden
  that grows past its soft limit and reports whether it restarted.

Each skips with the reason where the machine does not allow it (not root, no mount).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VICTIM = str(Path(__file__).parent / "victim.py")
TESTS = str(Path(__file__).parent.parent)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


@contextlib.contextmanager
def throwaway_user() -> Iterator[User]:
    """A real local user that exists only inside the block."""
    _need_root("a throwaway user")
    if not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("useradd and setpriv are needed for a second real uid")
    name = f"mw15-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        uid = int(subprocess.check_output(["id", "-u", name]))
        gid = int(subprocess.check_output(["id", "-g", name]))
        yield User(name, uid, gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True)  # the test ended its processes


def as_user(user: User, argv: list[str]) -> list[str]:
    """``argv`` run as ``user``, no supplementary groups."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups", *argv]


@contextlib.contextmanager
def sticky_dir(parent: Path | None = None) -> Iterator[Path]:
    """A fresh directory like ``/tmp`` (mode 1777) in the machine's temp dir, where any
    user can reach it (``parent`` is ignored: pytest's own are private)."""
    path = Path(tempfile.mkdtemp(prefix="mw15-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (0700, ours), unmounted after."""
    _need_root("mounting a tmpfs")
    path.mkdir(exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> None:
    """Fill the file system of ``directory`` to the last byte."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMWARDEN_", "XDG_"))}
    env.pop("DYNO", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), TESTS) if p)
    env.update(extra)
    return env


@dataclass
class Victim:
    status: int
    report: dict[str, Any]
    stderr: str


def run_victim(journal: Path, *args: str, timeout: float = 120, **env: str) -> Victim:
    """Run ``victim.py`` (as this user) with ``env``; its report and what it logged."""
    proc = subprocess.run(
        [sys.executable, VICTIM, str(journal), *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    return Victim(proc.returncode, report, proc.stderr)
