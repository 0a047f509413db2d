"""cgroup v2 in a real kernel: quota, gauges, OOM kills, ``check`` and ``run`` in a VM.

One VM boot (:mod:`cgroup2_vm`, QEMU with Debian's kernel, the host's root inside) for the
whole module; each test runs one check of :mod:`vm_guest` in it and asserts on its figures.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgroup2_vm import VM, VMUnavailable, image, unavailable
from conftest import IN_CI

GUEST = str(Path(__file__).parent / "vm_guest.py")
MB = 1024 * 1024

#: Emulated (TCG) on a busy machine: the Celery and demo checks take minutes, not seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    """One booted VM for the module (skipped with the reason where it cannot run, never
    in CI)."""
    reason = unavailable()
    img = None
    if reason is None:
        try:
            img = image()
        except VMUnavailable as exc:
            reason = str(exc)
    if reason is not None or img is None:
        if IN_CI:
            pytest.fail(f"no cgroup v2 VM: {reason} (CI=true: .ci/run installs it)")
        pytest.skip(f"no cgroup v2 VM: {reason}")
    machine = VM(img, tmp_path_factory.mktemp("vm-work"))
    machine.boot()
    try:
        yield machine
    finally:
        machine.close()


def guest(vm: VM, *args: str, timeout: float = 180.0) -> dict[str, Any]:
    result = vm.run([sys.executable, GUEST, *args], timeout=timeout)
    assert result.rc == 0, result.err[-4000:] + vm.tail()
    return json.loads(result.out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_guest_is_cgroup_v2_only(vm: VM) -> None:
    r = vm.run("cat /proc/self/cgroup; cat /sys/fs/cgroup/cgroup.controllers").check()
    assert r.out.splitlines()[0] == "0::/"
    assert "memory" in r.out.split()


def test_quota_is_the_smallest_memory_max_up_the_tree_and_in_a_namespace(vm: VM) -> None:
    got = guest(vm, "quota")
    nested = got["nested"]
    assert nested["version"] == 2 and nested["path"].endswith("/mwt-quota/svc/leaf")
    assert nested["limit"] == 300 * MB and nested["source"].startswith("cgroup v2")
    assert nested["platform"] == "cgroup"
    assert got["leaf_smallest"]["limit"] == 200 * MB
    bare = got["no_controller"]
    assert isinstance(bare, dict) and bare["limit"] == 200 * MB, bare
    assert bare["path"].endswith("/mwt-quota/svc/leaf"), bare
    # In its own cgroup namespace the container's cgroup is the root of what it sees.
    ns = got["namespace"]
    assert isinstance(ns, dict), ns
    assert ns["path"] == "/sys/fs/cgroup" and ns["limit"] == 200 * MB, ns
    # A namespace that kept the outer mount: the cgroup found is still its own.
    kept = got["namespace_kept_mount"]
    assert isinstance(kept, dict), kept
    assert kept["limit"] == 200 * MB and kept["path"].endswith("/mwt-quota/svc/leaf"), kept


def test_the_working_set_leaves_out_inactive_file_cache(vm: VM) -> None:
    # A file of the host's root, read through the guest's page cache (9p, cache=loose).
    big = image().vmlinux
    got = guest(vm, "gauge", str(big))
    assert "error" not in got, got
    size = big.stat().st_size
    assert got["anon"] >= 96 * MB
    assert got["inactive_file"] >= size // 2, got["stat"]
    assert got["working_set"] == got["usage"] - got["inactive_file"]
    assert got["usage"] >= 96 * MB + size // 2
    # The fast path (kept fds) and the gauge agree with the full read within 8 MiB.
    for fast in (got["fast"], got["gauge"]):
        assert abs(fast - got["working_set"]) < 8 * MB, got
    assert got["working_set"] < 96 * MB + size // 2


def test_the_oom_kill_counter_goes_from_0_to_1(vm: VM) -> None:
    got = guest(vm, "oom")
    assert got["rc"] == -9
    assert got["before"] == 0 and got["after"] == 1
    assert got["events"]["oom_kill"] == 1 and got["events"]["max"] >= 1


def test_check_reports_the_v2_quota_and_gauge(vm: VM) -> None:
    got = guest(vm, "check")
    assert got["rc"] == 0, got["err"]
    out = got["out"]
    assert "256.0 MiB" in out and f"cgroup v2 {got['path']}" in out, out
    assert "gauge         cgroup" in out, out


def test_run_restarts_a_growing_command_in_its_child_cgroup_before_the_kernel(
    vm: VM, tmp_path_factory: pytest.TempPathFactory
) -> None:
    journal = vm.work / "run.jsonl"
    got = guest(vm, "run", str(journal))
    assert journal.exists(), got
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    restarts = [r for r in records if r["event"] == "restart"]
    assert len(restarts) >= 2, got["err"]
    assert {r["gauge"] for r in restarts} == {"cgroup"}
    assert all(r["total"] < 256 * MB for r in restarts)
    assert got["events"]["oom_kill"] == 0
    # The command ran in run's child cgroup, which is gone after run.
    assert [c for c in got["seen"] if c.startswith("memwarden-run-")], got
    procs = [p for c, p in got["command_cgroups"].items() if c.startswith("memwarden-run-")]
    assert procs and procs[0], got
    assert got["left"] == [], got
    assert got["rc"] == 128 + 15, got  # the command's own end: SIGTERM, passed on by run
    # The brake: run alone in its cgroup moved into a leaf beside its command's, gave its
    # children the memory controller, and set memory.high a little under the hard limit.
    (command,) = [c for c in got["command_cgroups"] if c.startswith("memwarden-run-")]
    (leaf,) = [c for c in got["command_cgroups"] if c.startswith("memwarden-sup-")]
    assert "memory" in got["controllers"] and "memory" not in got["controllers_after"]
    brakes = [r for r in records if r["event"] == "brake"]
    hard = int(256 * MB * 0.95)
    assert [b["high"] for b in brakes] == [int(hard * 0.98) // 4096 * 4096]
    assert got["highs"][command] == str(brakes[0]["high"]), got
    assert got["highs"][leaf] == "max"


def test_run_restarts_a_command_on_sustained_full_pressure_under_the_soft_limit(
    vm: VM,
) -> None:
    journal = vm.work / "pressure.jsonl"
    got = guest(vm, "pressure", str(journal))
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    restarts = [r for r in records if r["event"] == "restart"]
    assert restarts, got
    first = restarts[0]
    assert first["reason"].startswith("memory pressure: full "), first
    assert first["total"] < first["limit"], first  # under the soft limit
    assert got["events"]["high"] >= 1 and got["events"]["oom_kill"] == 0, got


def test_the_celery_prefork_guard_keeps_200_jobs_and_recycles_children(vm: VM) -> None:
    got = guest(vm, "celery", str(vm.work), timeout=600)
    assert got["done"] == got["sent"] == 200, got["log_tail"]
    assert got["recycles"] >= 1, got
    assert got["job_pids"] >= 3  # fresh pool children forked, serving
    assert got["events"].get("kill", 0) == 0 and got["oom_kill"] == 0, got
    assert "WorkerLostError" not in got["log_tail"]


def test_make_demo_in_a_v2_cgroup(vm: VM) -> None:
    got = guest(vm, "demo", str(vm.work), timeout=400)
    assert got["rc"] == 0, got["out"][-3000:] + got["err"]
    out = got["out"]
    assert "memwarden demo: one worker" in out and "next: memwarden diagnose" in out, out
    assert "restarts      " in out and got["events"]["oom_kill"] == 0
