"""The guest side of :mod:`cgroup2_vm`: runs the host's commands in the VM.

Started by the initramfs (chrooted into the host's root) with the virtio serial port as its
argument. Reads one JSON request a line: ``{"argv", "env", "cwd", "timeout"}`` and answers
``{"rc", "out", "err", "seconds"}``; ``{"hello": 1}`` is answered in kind, ``{"quit": 1}``
ends it (the initramfs then powers the guest off). Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36


def setup() -> None:
    """Every controller for the children of the root cgroup; orphans come back to us."""
    with contextlib.suppress(OSError):
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with contextlib.suppress(OSError):
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            wanted = f.read().split()
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
            f.write(" ".join("+" + c for c in wanted))


def run(req: dict) -> dict:
    env = dict(os.environ)
    env.update(req.get("env") or {})
    started = time.monotonic()
    proc = subprocess.Popen(
        req["argv"],
        env=env,
        cwd=req.get("cwd") or "/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=req.get("timeout") or 120)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, err = 124, err + b"\n[vm_agent] timed out"
    reap()
    return {
        "rc": rc,
        "out": out.decode(errors="replace"),
        "err": err.decode(errors="replace"),
        "seconds": round(time.monotonic() - started, 3),
    }


def reap() -> None:
    """Orphans that came back to us."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def main(port: str) -> None:
    setup()
    fd = os.open(port, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            time.sleep(0.05)  # the host is not connected yet
            continue
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            if not line.strip():
                continue
            req = json.loads(line)
            if req.get("quit"):
                return
            answer = {"hello": 1} if req.get("hello") else run(req)
            data = json.dumps(answer).encode() + b"\n"
            while data:
                data = data[os.write(fd, data) :]


if __name__ == "__main__":
    main(sys.argv[1])
