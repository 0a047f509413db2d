"""Issue 15, items 3, 9 and 10: the journal writer across processes, on a full disk, and
behind a symlink."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from faultkit import clean_env

WRITER = str(Path(__file__).parent / "journal_writer.py")


def lines_of(path: Path) -> list[str]:
    """Every line of the journal and of its rotated files, oldest file first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    out: list[str] = []
    for f in [*files, path]:
        if f.exists():
            out += f.read_text().splitlines()
    return out


def test_eight_writers_rotating_at_1mb_for_20s_lose_nothing_and_tear_nothing(tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    writers = [
        subprocess.Popen(
            [sys.executable, WRITER, str(journal), str(i), "20", "1000000", "400"],
            env=clean_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    written = {}
    for i, proc in enumerate(writers):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        written[i] = int(out.strip())
    lines = lines_of(journal)
    torn = [line for line in lines if not _is_record(line)]
    assert torn == [], f"{len(torn)} torn lines, e.g. {torn[:2]}"
    seen = Counter((r["writer"], r["seq"]) for r in map(json.loads, lines))
    twice = [k for k, n in seen.items() if n > 1]
    missing = [(w, s) for w, n in written.items() for s in range(n) if (w, s) not in seen]
    assert twice == [], f"{len(twice)} records written twice"
    assert missing == [], f"{len(missing)} of {sum(written.values())} records lost"
    rotated = list(tmp_path.glob("journal.jsonl.*"))
    assert len(rotated) >= 3, "the test must rotate several times to mean anything"
    assert all(f.stat().st_size <= 1_100_000 for f in rotated)


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_a_full_disk_never_leaves_a_partial_line(tmp_path: Path):
    from faultkit import tmpfs

    from memwarden.journal import Journal

    with tmpfs(tmp_path / "fs", size="64k") as fs:
        ballast = fs / "ballast"
        ballast.write_bytes(b"\0" * 16384)
        journal = Journal(str(fs / "j.jsonl"), max_bytes=10**9)
        stuck = 0
        n = 0
        while stuck < 5:
            size = (fs / "j.jsonl").stat().st_size if (fs / "j.jsonl").exists() else 0
            journal.write("before", n=n, pad="b" * 1000)
            n += 1
            grown = (fs / "j.jsonl").stat().st_size > size
            stuck = 0 if grown else stuck + 1
        ballast.unlink()  # room again
        for i in range(10):
            journal.write("after", n=i, pad="a" * 1000)
        journal.close()
        lines = (fs / "j.jsonl").read_text().splitlines()
    torn = [line[:60] for line in lines if not _is_record(line)]
    assert torn == [], torn
    after = [r["n"] for r in map(json.loads, lines) if r["event"] == "after"]
    assert after == list(range(10))


def test_a_journal_symlink_planted_by_another_user_is_refused(tmp_path: Path, caplog):
    from faultkit import as_user, sticky_dir, throwaway_user

    from memwarden.journal import Journal

    target = tmp_path / "precious.txt"
    target.write_text("the victim's own data\n")
    with throwaway_user() as neighbour, sticky_dir() as tmp:
        path = tmp / "memwarden.jsonl"
        subprocess.run(as_user(neighbour, ["ln", "-s", str(target), str(path)]), check=True)
        journal = Journal(str(path))
        journal.write("job", job="x")
        journal.close()
    assert target.read_text() == "the victim's own data\n"
    assert "symlink made by uid" in caplog.text and "refused" in caplog.text


def test_a_journal_symlink_of_our_own_is_followed(tmp_path: Path):
    from memwarden.journal import Journal

    real = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    journal = Journal(str(link))
    journal.write("job", job="x")
    journal.close()
    assert json.loads(real.read_text())["job"] == "x"


def test_a_journal_lock_held_by_another_user_costs_one_wait_not_one_per_line(tmp_path, caplog):
    """The flock that keeps writers apart is one another user can hold on a journal they
    may read: a line then waits for it once, and the next ones do not."""
    import time

    from faultkit import as_user, sticky_dir, throwaway_user

    from conftest import wait_for
    from memwarden.journal import Journal

    with throwaway_user() as neighbour, sticky_dir() as tmp:
        path = tmp / "j.jsonl"
        journal = Journal(str(path))
        journal.write("first")
        holder = subprocess.Popen(
            as_user(neighbour, ["flock", "--exclusive", "--no-fork", str(path), "sleep", "300"])
        )
        try:
            wait_for(
                lambda: subprocess.run(["flock", "--nonblock", str(path), "true"]).returncode,
                30,
                what="the neighbour holding the journal's lock",
            )
            started = time.monotonic()
            for i in range(20):
                journal.write("job", n=i)
            took = time.monotonic() - started
        finally:
            holder.kill()
            holder.wait(10)
        journal.close()
        lines = path.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines[1:]] == list(range(20))
    assert took < journal.lock_wait + 3.0, f"20 lines took {took:.1f}s"
    assert caplog.text.count("locked by another process") == 1
