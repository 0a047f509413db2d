"""The private state directory: host lock, restart history, OOM count, pool flags and FIFOs.

Where it is (:func:`locate`):

- ``MEMWARDEN_STATE_DIR`` when set: created 0700 if missing; refused at start (a
  :class:`~memwarden.units.SettingError`) unless it is a directory of this user that no other
  user can write to.
- else ``$XDG_RUNTIME_DIR/memwarden`` (systemd's per-user 0700 directory), else
  ``<temp dir>/memwarden-<uid>``: created 0700, and used only while it is a real directory
  (not a symlink) owned by this user with no access for anybody else (one left readable by
  an older memwarden is tightened to 0700). Anything else — planted by another user, or
  writable by others — is refused with an ERROR saying why and what to do, and this process
  (with the pool children it forks) uses a fresh private temp directory instead: guarded
  still, but without the host lock and restart history shared with other workers.

Inside it, files are opened with ``O_NOFOLLOW`` and used only when they are regular files of
ours (:func:`open_file`), written by an atomic rename of a fresh ``O_EXCL`` file
(:func:`write_atomic`); a FIFO is made fresh (:func:`make_fifo`) and written to only when it
is still a FIFO of ours (:func:`poke_fifo`). :class:`Said` keeps a condition that holds (an
unusable directory, a capped restart) to one log line per episode, then one a minute.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from memwarden.units import SettingError

log = logging.getLogger("memwarden")

SETTING = "MEMWARDEN_STATE_DIR"
EXAMPLE = "/run/user/1000/memwarden"
#: A condition said once is said again at most this often (seconds).
SAY_AGAIN_AFTER = 60.0
#: Errors of a full or failing disk: the directory is right, the moment is not.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


@dataclass(frozen=True)
class Where:
    """The state directory in use, where that choice came from, and what was refused."""

    path: str
    source: str  # MEMWARDEN_STATE_DIR, XDG_RUNTIME_DIR, temp dir, private fallback
    problem: str | None = None


_fallbacks: dict[str, str] = {}  # refused default -> the private directory used instead
_fallback_lock = threading.Lock()


def locate(configured: str | None = None, env: Mapping[str, str] | None = None) -> Where:
    """The state directory to use now (created if missing). Raises :class:`SettingError`
    for a ``MEMWARDEN_STATE_DIR`` that must not be used."""
    env = os.environ if env is None else env
    if configured:
        return _explicit(os.path.abspath(configured))
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and _private(runtime, create=False, fix=False) is None:
        path = os.path.join(runtime, "memwarden")
        if _private(path) is None:
            return Where(path, "XDG_RUNTIME_DIR")
    path = os.path.join(tempfile.gettempdir(), f"memwarden-{os.getuid()}")
    problem = _private(path)
    if problem is None:
        return Where(path, "temp dir")
    return _fall_back(path, problem)


def _private(path: str, create: bool = True, fix: bool = True) -> str | None:
    """None when ``path`` is (or was just made) a directory of ours that only we can use
    (one others may only read is tightened to 0700 when ``fix``); else why not."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            return f"it cannot be created ({exc.strerror})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symlink" if os.path.islink(path) else "not a directory"
            return f"it is {kind}"
        return f"it cannot be opened ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            return (
                f"it belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
                "another user may have made it"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            return f"other users can write to it (mode {mode:o})"
        if mode & 0o077:
            if not fix:
                return f"other users can read it (mode {mode:o})"
            os.fchmod(fd, 0o700)
    except OSError as exc:
        return f"it cannot be checked ({exc.strerror})"
    finally:
        os.close(fd)
    return None


def _explicit(path: str) -> Where:
    """``MEMWARDEN_STATE_DIR``: the user's choice, so a symlink to it is fine, another
    user's directory is not; a full disk now is said, not fatal."""
    try:
        os.makedirs(path, 0o700, exist_ok=True)
    except FileExistsError:
        raise SettingError(SETTING, path, "it exists and is not a directory", EXAMPLE) from None
    except OSError as exc:
        if exc.errno in TRANSIENT:
            return Where(path, SETTING, f"it cannot be created ({exc.strerror})")
        raise SettingError(
            SETTING, path, f"it cannot be created ({exc.strerror})", EXAMPLE
        ) from None
    me = os.getuid()
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        raise SettingError(SETTING, path, f"it is a symlink made by uid {link.st_uid}", EXAMPLE)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise SettingError(SETTING, path, "it is not a directory", EXAMPLE)
    if st.st_uid != me:
        raise SettingError(
            SETTING, path, f"it belongs to uid {st.st_uid}: use a directory of your own", EXAMPLE
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise SettingError(
            SETTING, path, f"other users can write to it (mode {mode:o}): chmod 700 it", EXAMPLE
        )
    return Where(path, SETTING)


def _fall_back(path: str, problem: str) -> Where:
    """A fresh private directory for this process and its forks, said loudly once."""
    with _fallback_lock:
        private = _fallbacks.get(path)
        if private is None or not os.path.isdir(private):
            try:
                private = tempfile.mkdtemp(prefix=f"memwarden-{os.getuid()}-")
            except OSError:
                log.error("memwarden: state dir %s refused (%s), and no other one", path, problem)
                return Where(path, "temp dir", problem)
            _fallbacks[path] = private
            atexit.register(_remove, private, os.getpid())
            log.error(
                "memwarden: refusing the state dir %s: %s. Using %s for this process only: "
                "the host lock and the restart history are not shared with other workers. "
                "Remove %s, or set MEMWARDEN_STATE_DIR (or XDG_RUNTIME_DIR) to a directory "
                "of your own.",
                path,
                problem,
                private,
                path,
            )
    return Where(private, "private fallback", f"{path} refused: {problem}")


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not from a forked pool child
        shutil.rmtree(path, ignore_errors=True)


def problem_of(path: str) -> str | None:
    """Why files cannot be made in ``path`` now (None: they can), for ``memwarden check``."""
    probe = os.path.join(path, f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return f"files cannot be made in it ({exc.strerror})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


# --------------------------------------------------------------------- files inside
def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symlink, never blocks on a planted FIFO, and hands
    back only a regular file of ours (else ``OSError``)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "not a regular file of this user", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_text(path: str, limit: int = 1 << 20) -> str | None:
    """The text of a state file of ours, or None (missing, unreadable, not ours)."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: a fresh ``O_EXCL`` file renamed over it (raises
    ``OSError``; nothing half-written is ever left under ``path``)."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_fifo(path: str) -> int:
    """A fresh FIFO at ``path`` (0600), opened read-write (a writer never blocks on it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "not a FIFO of this user", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def poke_fifo(path: str, data: bytes = b"r") -> bool:
    """Write ``data`` into the FIFO at ``path`` if it is one of ours with a reader; False
    otherwise (missing, no reader, a symlink, a regular file, another user's)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # ENOENT: nobody listens; ENXIO: its reader is gone; ELOOP: a symlink
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
            return False
        return os.write(fd, data) == len(data)
    except BlockingIOError:  # requests already waiting, which is as good
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------- saying it
class Said:
    """A condition that holds said once per episode, then at most every ``every`` seconds;
    :meth:`over` ends the episode (the next occurrence is said at once)."""

    def __init__(self, every: float = SAY_AGAIN_AFTER) -> None:
        self.every = every
        self._at: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True when the condition should be said now (and counts it as said)."""
        now = time.monotonic()
        with self._lock:
            if self._at is not None and now - self._at < self.every:
                return False
            self._at = now
            return True

    def over(self) -> bool:
        """End the episode; True if one was under way."""
        with self._lock:
            was, self._at = self._at is not None, None
            return was
