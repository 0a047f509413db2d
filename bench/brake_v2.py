"""The runaway cell with and without the ``memory.high`` brake, in a real cgroup v2 kernel.

The field matrix's ``run/runaway`` cell (``bench/field.py``: ``memwarden run`` of a worker
whose job allocates as fast as it can, up to 1 GiB/s, ``--tries`` times; who stopped each:
the kernel's OOM killer or memwarden) runs in the VM of ``tests/cgroup2_vm.py`` (QEMU,
Debian's kernel, cgroup v2 only, 2 vCPUs), once with the brake (the default) and once with
``MEMWARDEN_BRAKE=off``, Redis inside the guest. First the guest's allocation rate is
measured the way the runaway job allocates (8 MiB ``bytearray`` steps), so the cell's pace
is known, not assumed.

    python bench/brake_v2.py [--tries 10] [--out docs]

prints the two cells' figure lines and, with ``--out``, a table for docs/benchmarks.md.
Inside the guest it runs itself with ``--guest``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VM = REPO / "tests" / "cgroup2_vm.py"
MB = 1024 * 1024


# --------------------------------------------------------------------- in the guest
def alloc_rate(seconds: float = 1.0, cap_mb: int = 512) -> float:
    """MiB/s of the runaway job's allocation (8 MiB bytearray steps, no pause)."""
    held = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and len(held) * 8 < cap_mb:
        held.append(bytearray(b"\x06") * (8 * MB))
    return len(held) * 8 / (time.monotonic() - t0)


def loop_seconds() -> float:
    """Seconds for 2 million additions in a Python loop: the guest's pace against the
    host's (the warden is Python too)."""
    t0 = time.perf_counter()
    n = 0
    for i in range(2_000_000):
        n += i
    return time.perf_counter() - t0


def guest(tries: int) -> None:
    """Redis, a cgroup of our own to make dynos beside, the rate, then both cells."""
    sys.path.insert(0, str(HERE))
    root = "/sys/fs/cgroup"
    with open(f"{root}/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids")
    os.makedirs(f"{root}/bench/ctl", exist_ok=True)
    with open(f"{root}/bench/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids")
    with open(f"{root}/bench/ctl/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    redis = ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", ""]
    subprocess.run([*redis, "--appendonly", "no", "--daemonize", "yes"], check=True)
    time.sleep(1)
    rates = sorted(alloc_rate() for _ in range(3))
    loop = min(loop_seconds() for _ in range(3))
    print(json.dumps({"alloc_mib_s": [round(r) for r in rates], "loop_s": round(loop, 3)}))
    import field

    plain = field.cell_env
    for mode in ("on", "off"):

        def cell_env(*args, _mode=mode, **kw):  # type: ignore[no-untyped-def]
            env = plain(*args, **kw)
            env["MEMWARDEN_BRAKE"] = _mode
            return env

        field.cell_env = cell_env
        t0 = time.monotonic()
        out = subprocess_free_main(field, tries)
        print(json.dumps({"brake": mode, "seconds": round(time.monotonic() - t0), **out}))


def subprocess_free_main(field, tries: int) -> dict:  # type: ignore[no-untyped-def]
    """One run of the cell through field.main, its figure line parsed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        field.main(["--cells", "run/runaway", "--tries", str(tries)])
    lines = [line for line in buf.getvalue().splitlines() if line.startswith("cell=")]
    parsed = field.parse("\n".join(lines))
    return parsed[0] if parsed else {"output": buf.getvalue()[-2000:]}


# --------------------------------------------------------------------- on the host
def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help="write <out>/bench-brake-v2.md")
    a = p.parse_args()
    if a.guest:
        guest(a.tries)
        return 0
    host = {
        "host_alloc_mib_s": [round(alloc_rate()) for _ in range(3)],
        "host_loop_s": round(min(loop_seconds() for _ in range(3)), 3),
    }
    cmd = f"{sys.executable} {Path(__file__).resolve()} --guest --tries {a.tries}"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(VM), "shell", "--timeout", "5400", cmd],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.monotonic() - t0
    sys.stderr.write(done.stderr[-4000:])
    rows = [host] + [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row))
    print(f"# {elapsed:.0f}s in all", file=sys.stderr)
    if a.out and rows:
        Path(a.out, "bench-brake-v2.md").write_text(table(rows, a.tries))
    return done.returncode


def table(rows: list[dict], tries: int) -> str:
    """The two cells side by side, with the guest's pace against the host's."""
    fig = {k: v for r in rows for k, v in r.items() if "brake" not in r}
    lines = [
        "| memory.high brake | tries | kernel OOM kills | killed by memwarden first | "
        "peak (limit) | s over the hard limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "brake" in r:
            lines.append(
                f"| {r['brake']} | {r.get('tries')} | {r.get('kernel_wins')} | "
                f"{r.get('memwarden_wins')} | {r.get('peak_mib')} MiB ({r.get('limit_mib')} MiB)"
                f" | {r.get('over_hard_s')} |"
            )
    guest_rate, host_rate = fig.get("alloc_mib_s", []), fig.get("host_alloc_mib_s", [])
    slower = fig["loop_s"] / fig["host_loop_s"] if fig.get("host_loop_s") else 0
    return (
        f"`run/runaway`, {tries} tries each, in the cgroup v2 VM (TCG, 2 vCPUs). The runaway "
        f"job's allocation: {guest_rate} MiB/s in the guest ({host_rate} MiB/s on the host); "
        f"Python runs {slower:.1f}x slower in the guest, the warden included.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
