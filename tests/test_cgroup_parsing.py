"""cgroup discovery and figures on fixture trees of real file contents (v1, v2, hybrid)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.quota import detect_quota
from memwarden.units import SettingError

MB = 1024 * 1024

V1_STAT = """cache 52162560
rss 2301952
inactive_anon 2179072
active_anon 8192
inactive_file 12865536
active_file 39297024
hierarchical_memory_limit {limit}
hierarchical_memsw_limit 9223372036854771712
total_cache 52162560
total_rss 302301952
total_inactive_anon 2179072
total_active_anon 8192
total_inactive_file 12865536
total_active_file 39297024
"""
V1_OOM = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
# This project's CI machines: a 0::/ line for cgroup2, memory on v1 (a hybrid hierarchy).
HYBRID_CGROUP = """9:name=systemd:/
4:memory:/process_api/abc
3:cpuset:/
0::/
"""
HYBRID_MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_CGROUP = "0::/kubepods.slice/pod1/ctr\n"
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_STAT = """anon 104857600
file 73400320
kernel 2097152
shmem 0
active_anon 104857600
inactive_anon 0
active_file 20971520
inactive_file 52428800
"""
V2_EVENTS = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n"
# Inside a container with a cgroup namespace: the mount root is the container's own path.
NS_MOUNTINFO = (
    "35 31 0:32 /process_api/abc /sys/fs/cgroup/memory ro,relatime - cgroup cgroup rw,memory\n"
)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, limit: int, mountinfo: str = HYBRID_MOUNTINFO, at: str = "") -> None:
    write(root, "proc/self/cgroup", HYBRID_CGROUP)
    write(root, "proc/self/mountinfo", mountinfo)
    d = "sys/fs/cgroup/memory" + (at or "/process_api/abc")
    write(root, f"{d}/memory.usage_in_bytes", str(400 * MB))
    write(root, f"{d}/memory.limit_in_bytes", str(limit))
    write(root, f"{d}/memory.stat", V1_STAT.format(limit=limit))
    write(root, f"{d}/memory.oom_control", V1_OOM)


def test_hybrid_prefers_the_v1_memory_controller(tmp_path):
    v1_tree(tmp_path, 512 * MB)
    # the unified hierarchy exists too, without memory files
    (tmp_path / "sys/fs/cgroup/unified").mkdir(parents=True)
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None and cg.version == 1
    assert cg.path.endswith("sys/fs/cgroup/memory/process_api/abc")
    mem = cg.read()
    assert mem.limit == 512 * MB
    assert mem.usage == 400 * MB
    assert mem.working_set == 400 * MB - 12865536  # usage − total_inactive_file
    assert cg.working_set() == mem.working_set  # the watchdog's cheap read agrees
    assert mem.anon == 302301952  # total_rss, not the local rss
    assert mem.oom_kills == 2


def test_working_set_reads_afresh_through_its_kept_files(tmp_path):
    """The kept fds are read from the start each time: new contents, new figure; a v1
    cgroup without hierarchy totals falls back to its own inactive file cache."""
    v1_tree(tmp_path, 512 * MB)
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None
    assert cg.working_set() == 400 * MB - 12865536
    d = Path(cg.path)
    (d / "memory.usage_in_bytes").write_text(str(450 * MB))
    (d / "memory.stat").write_text("cache 1\ninactive_file 1048576\nactive_file 5\n")
    assert cg.working_set() == 449 * MB
    cg.close()
    assert cg.working_set() == 449 * MB  # opens again after close


def test_v1_unlimited_is_none(tmp_path):
    v1_tree(tmp_path, 9223372036854771712)
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None and cg.limit() is None


def test_v1_inside_a_cgroup_namespace(tmp_path):
    v1_tree(tmp_path, 256 * MB, mountinfo=NS_MOUNTINFO, at="/")
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None and cg.limit() == 256 * MB
    assert cg.path.rstrip("/").endswith("sys/fs/cgroup/memory")


def v2_tree(root: Path, limits: dict[str, str]) -> None:
    write(root, "proc/self/cgroup", V2_CGROUP)
    write(root, "proc/self/mountinfo", V2_MOUNTINFO)
    for rel, value in limits.items():
        write(root, f"sys/fs/cgroup{rel}/memory.max", value)
    d = "sys/fs/cgroup/kubepods.slice/pod1/ctr"
    write(root, f"{d}/memory.current", str(300 * MB))
    write(root, f"{d}/memory.stat", V2_STAT)
    write(root, f"{d}/memory.events", V2_EVENTS)


def test_v2_smallest_limit_up_the_ancestors(tmp_path):
    v2_tree(
        tmp_path,
        {
            "/kubepods.slice": str(2048 * MB),
            "/kubepods.slice/pod1": str(768 * MB),
            "/kubepods.slice/pod1/ctr": "max",
        },
    )
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None and cg.version == 2
    mem = cg.read()
    assert mem.limit == 768 * MB
    assert mem.working_set == 300 * MB - 52428800
    assert cg.working_set() == mem.working_set
    assert mem.anon == 104857600
    assert mem.oom_kills == 1


def test_v2_no_limit_anywhere(tmp_path):
    v2_tree(tmp_path, {"/kubepods.slice/pod1/ctr": "max"})
    cg = Cgroup.of_self(str(tmp_path))
    assert cg is not None and cg.limit() is None


def test_no_cgroup_files_means_none(tmp_path):
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "proc/self/mountinfo", V2_MOUNTINFO)
    assert Cgroup.of_self(str(tmp_path)) is None
    assert Cgroup.of_self(str(tmp_path / "nowhere")) is None


# ---------------------------------------------------------------- quota detection order
def test_quota_setting_wins(tmp_path):
    v1_tree(tmp_path, 512 * MB)
    cg = Cgroup.of_self(str(tmp_path))
    q = detect_quota({"MEMWARDEN_QUOTA": "1GiB", "DYNO": "worker.1"}, cg)
    assert (q.limit, q.source, q.platform) == (1024 * MB, "MEMWARDEN_QUOTA", "heroku")


def test_quota_cgroup_before_dyno_size(tmp_path):
    v1_tree(tmp_path, 512 * MB)
    cg = Cgroup.of_self(str(tmp_path))
    q = detect_quota({"DYNO": "worker.1", "MEMWARDEN_DYNO_SIZE": "performance-l"}, cg)
    assert q.limit == 512 * MB and q.source.startswith("cgroup v1")
    assert q.platform == "heroku" and not q.kernel_enforced


def test_quota_dyno_size_table_when_no_cgroup_limit(tmp_path):
    v1_tree(tmp_path, 9223372036854771712)
    cg = Cgroup.of_self(str(tmp_path))
    q = detect_quota({"DYNO": "worker.1", "MEMWARDEN_DYNO_SIZE": "Standard-2X"}, cg)
    assert q.limit == 1024 * MB and q.source == "heroku dyno size standard-2x"


def test_quota_none(tmp_path):
    q = detect_quota({}, None)
    assert q.limit is None and q.source == "none" and q.platform == "bare"
    assert detect_quota({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, None).platform == "kubernetes"


def test_quota_cgroup_on_bare_metal_is_kernel_enforced(tmp_path):
    v1_tree(tmp_path, 512 * MB)
    q = detect_quota({}, Cgroup.of_self(str(tmp_path)))
    assert q.platform == "cgroup" and q.kernel_enforced


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"MEMWARDEN_QUOTA": "lots"}, "MEMWARDEN_QUOTA"),
        ({"DYNO": "w.1", "MEMWARDEN_DYNO_SIZE": "huge"}, "MEMWARDEN_DYNO_SIZE"),
    ],
)
def test_bad_quota_settings_are_named(env, name):
    with pytest.raises(SettingError, match=name):
        detect_quota(env, None)


def test_this_machine_is_read_for_real():
    """Where a memory cgroup exists (it does on CI), its figures are sane and live."""
    cg = Cgroup.of_self()
    if cg is None:
        pytest.skip("no memory cgroup on this machine")
    mem = cg.read()
    assert 0 < mem.working_set <= mem.usage
    assert abs(cg.working_set() - mem.working_set) < 64 * MB  # bytes, the same figure
    assert os.path.isdir(cg.path)
