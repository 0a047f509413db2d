"""Issue 15, item 1: another local user can neither switch the warden off nor use it to
clobber files. Two real uids: this test (root, the victim) and a throwaway user (the
neighbour) made with ``useradd`` and run with ``setpriv``. ``TMPDIR`` points both at a
sticky directory of the test's own, so the machine's ``/tmp/memwarden-0`` is never touched.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import as_user, clean_env, run_victim, sticky_dir, throwaway_user

from conftest import wait_for
from memwarden.config import Config

MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
STATE_PATH = "from memwarden.config import Config; print(Config().state_path)"


def plant(neighbour, script: str, **env: str) -> None:
    """Run a shell ``script`` as the neighbour."""
    done = subprocess.run(
        as_user(neighbour, ["sh", "-c", script]), env={**os.environ, **env}, capture_output=True
    )
    assert done.returncode == 0, done.stderr


def precious(tmp_path: Path) -> Path:
    """A file of the victim's that a clobbering warden would overwrite."""
    path = tmp_path / "precious.txt"
    path.write_text("the victim's own data\n")
    path.chmod(0o600)
    return path


def test_a_planted_dir_with_a_lock_symlink_is_refused_and_nothing_is_clobbered(tmp_path):
    target = precious(tmp_path)
    with throwaway_user() as neighbour, sticky_dir(tmp_path) as tmp:
        planted = tmp / f"memwarden-{os.getuid()}"
        plant(
            neighbour,
            'mkdir -m 0777 "$D" && ln -s "$T" "$D/lock" && ln -s "$T" "$D/restarts.json"',
            D=str(planted),
            T=str(target),
        )
        victim = run_victim(tmp_path / "journal.jsonl", TMPDIR=str(tmp))
    assert victim.status == 0, victim.stderr
    assert target.read_text() == "the victim's own data\n"
    assert victim.report["restarted"], victim.stderr
    assert victim.report["state_dir"] != str(planted)
    assert f"refusing the state dir {planted}" in victim.stderr
    assert f"belongs to uid {neighbour.uid}" in victim.stderr


def test_a_forged_history_and_a_held_lock_do_not_stop_restarts(tmp_path):
    with throwaway_user() as neighbour, sticky_dir(tmp_path) as tmp:
        planted = tmp / f"memwarden-{os.getuid()}"
        now = time.time()
        forged = json.dumps([[now - i, True] for i in range(20)])
        plant(
            neighbour,
            'mkdir -m 0777 "$D" && printf %s "$H" > "$D/restarts.json" && '
            'touch "$D/lock" && chmod 0666 "$D/restarts.json" "$D/lock"',
            D=str(planted),
            H=forged,
        )
        holder = subprocess.Popen(
            as_user(
                neighbour,
                ["flock", "--exclusive", "--no-fork", str(planted / "lock"), "sleep", "300"],
            )
        )
        try:
            wait_for(
                lambda: (
                    subprocess.run(
                        ["flock", "--nonblock", str(planted / "lock"), "true"]
                    ).returncode
                    != 0
                ),
                30,
                what="the neighbour holding the lock",
            )
            victim = run_victim(tmp_path / "journal.jsonl", TMPDIR=str(tmp))
        finally:
            holder.kill()
            holder.wait(10)
    assert victim.status == 0, victim.stderr
    assert victim.report["restarted"], victim.stderr
    assert "another is under way" not in victim.stderr
    assert f"refusing the state dir {planted}" in victim.stderr


def test_check_says_where_state_lives_and_that_the_planted_dir_is_refused(tmp_path):
    with throwaway_user() as neighbour, sticky_dir(tmp_path) as tmp:
        planted = tmp / f"memwarden-{os.getuid()}"
        plant(neighbour, 'mkdir -m 0777 "$D"', D=str(planted))
        out = subprocess.run(
            [*MEMWARDEN, "check", "--json"],
            env=clean_env(TMPDIR=str(tmp), MEMWARDEN_QUOTA="2GB"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["state_dir"] != str(planted)
    assert any(str(planted) in w and "refused" in w for w in report["warnings"]), report
    assert f"refusing the state dir {planted}" in out.stderr


def test_the_default_state_dir_is_private(tmp_path):
    with sticky_dir(tmp_path) as tmp:
        env = clean_env(TMPDIR=str(tmp))
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from memwarden.config import Config; print(Config().state_path)",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        path = Path(out.stdout.strip())
        st = path.lstat()
        assert path == tmp / f"memwarden-{os.getuid()}"
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        assert stat.S_IMODE(st.st_mode) == 0o700


def test_xdg_runtime_dir_is_preferred_when_it_is_ours(tmp_path, monkeypatch):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert Config().state_path == str(runtime / "memwarden")
    assert stat.S_IMODE(os.stat(runtime / "memwarden").st_mode) == 0o700


def test_a_state_dir_setting_of_another_user_fails_at_start(tmp_path):
    from memwarden.units import SettingError

    with throwaway_user() as neighbour:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, neighbour.uid, neighbour.gid)
        with pytest.raises(SettingError) as caught:
            Config(state_dir=str(theirs)).state_path  # noqa: B018
    assert "MEMWARDEN_STATE_DIR" in str(caught.value)
    assert f"uid {neighbour.uid}" in str(caught.value)


@pytest.mark.parametrize("planted", ["symlink", "regular file"])
def test_a_reclaim_request_never_writes_through_a_planted_file(tmp_path, planted):
    """The Celery reclaim FIFO: a request goes only into a FIFO of ours, never into a
    symlink's target or a plain file put where the FIFO should be."""
    from memwarden.reclaim import ask_to_reclaim

    target = precious(tmp_path)
    fifo = tmp_path / "celery-reclaim-4242"
    if planted == "symlink":
        fifo.symlink_to(target)
    else:
        fifo.write_text("the victim's own data\n")
        target = fifo
    assert ask_to_reclaim(str(fifo)) is False
    assert target.read_text() == "the victim's own data\n"


def test_an_xdg_runtime_dir_of_another_user_is_passed_over(tmp_path):
    with throwaway_user() as neighbour, sticky_dir() as tmp:
        runtime = tmp / "run-user"
        runtime.mkdir(mode=0o700)
        os.chown(runtime, neighbour.uid, neighbour.gid)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from memwarden.config import Config; print(Config().state_path)",
            ],
            env=clean_env(TMPDIR=str(tmp), XDG_RUNTIME_DIR=str(runtime)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(tmp / f"memwarden-{os.getuid()}")
        assert not (runtime / "memwarden").exists()
