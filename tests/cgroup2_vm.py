"""A real cgroup v2 kernel for tests: Debian's kernel in QEMU, the host's root inside.

This machine's memory controller is cgroup v1; the v2 paths meet a real kernel here. One VM
boot serves a whole test module (:func:`vm_fixture`):

- the kernel: Debian's ``linux-image-<version>-amd64`` (``apt-get download`` + ``dpkg-deb
  -x``; no /boot, no grub), booted as an uncompressed ``vmlinux`` (PVH: no decompression
  under emulation) with ``cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1``;
- an initramfs of ``busybox-static`` and the kernel's 9p, virtio and overlay modules, which
  mounts the host's root (shared read-only over 9p) under a tmpfs overlay, a writable share
  of a work directory at the same path as on the host, cgroup2 at ``/sys/fs/cgroup``, and
  chroots into it to start :mod:`vm_agent` (the host's own Python), which runs the test's
  commands sent over a virtio serial port;
- QEMU with KVM where it works, else TCG (``-accel tcg,thread=multi -cpu max``): the
  ``/dev/kvm`` of this project's machines is a nested device that cannot run Debian's kernel.

The kernel, its modules and the initramfs are cached in ``~/.cache/memwarden-vm/<version>``
(``MEMWARDEN_VM_CACHE``). Missing QEMU, busybox or kernel: the tests skip with the reason,
except in CI (``CI=true``), where ``.ci/run`` installs them and a missing one fails.
``python tests/cgroup2_vm.py build`` fills the cache (``.ci/run`` does); ``... shell`` boots
the VM and runs one command in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("MEMWARDEN_VM_CACHE", Path.home() / ".cache" / "memwarden-vm"))
BUSYBOX = "/bin/busybox"
QEMU = "qemu-system-x86_64"
#: Modules the initramfs loads, their dependencies found from each module's ``depends=``.
MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay")
MEMORY_MB = 1536
CPUS = 2
BOOT_TIMEOUT = 180.0  # s: TCG on a busy 2-core machine
#: A KVM boot answers in a few seconds or not at all (a nested device that cannot run the
#: kernel spins): after this long TCG takes over, and KVM is not tried again on this host
#: kernel (the marker file below).
KVM_TRIAL = 10.0
KVM_FAILED = CACHE / f"kvm-failed-{os.uname().release}"
CMDLINE = (
    "console=ttyS0 quiet loglevel=4 panic=-1 cgroup_no_v1=all "
    "systemd.unified_cgroup_hierarchy=1 mitigations=off tsc=reliable"
)


class VMUnavailable(Exception):
    """QEMU, busybox or the kernel is missing here (the reason is the message)."""


# --------------------------------------------------------------------- the kernel, cached
@dataclass(frozen=True)
class Image:
    """A cached kernel and its initramfs."""

    version: str
    vmlinux: Path
    initramfs: Path


def _complete(d: Path) -> bool:
    return (d / "vmlinux").is_file() and (d / "modules").is_dir()


def kernel_version() -> str:
    """The Debian kernel to boot: ``MEMWARDEN_VM_KERNEL``, else the newest cached one, else
    the one ``linux-image-amd64`` depends on now."""
    if os.environ.get("MEMWARDEN_VM_KERNEL"):
        return os.environ["MEMWARDEN_VM_KERNEL"]
    if CACHE.is_dir():
        cached = sorted((d for d in CACHE.iterdir() if _complete(d)), key=lambda d: d.name)
        if cached:
            return cached[-1].name
    if not shutil.which("apt-cache"):
        raise VMUnavailable("no apt-cache to find Debian's kernel (set MEMWARDEN_VM_KERNEL)")
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"Depends: linux-image-(\S+-amd64)", out)
    if not found:
        raise VMUnavailable("apt-cache knows no linux-image-amd64 (run apt-get update)")
    return found.group(1)


def image(version: str | None = None) -> Image:
    """The cached kernel + initramfs, built first where missing."""
    version = version or kernel_version()
    d = CACHE / version
    if not _complete(d):
        build(version, d)
    if not (d / INITRAMFS).is_file():  # the kernel is cached; the init script changed
        modules = modules_in_order(d / "modules")
        write_initramfs(d / INITRAMFS, modules)
    return Image(version, d / "vmlinux", d / INITRAMFS)


def build(version: str, dest: Path) -> None:
    """Download Debian's kernel package, extract ``vmlinux`` and build the initramfs."""
    if not os.path.exists(BUSYBOX) or "static" not in _file_kind(BUSYBOX):
        raise VMUnavailable(f"no static busybox at {BUSYBOX} (apt-get install busybox-static)")
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise VMUnavailable(f"no {tool} to fetch Debian's kernel")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = subprocess.run(
            ["apt-get", "download", f"linux-image-{version}"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise VMUnavailable(f"apt-get download linux-image-{version}: {got.stderr.strip()}")
        root = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        staged = Path(tmp) / "out"
        staged.mkdir()
        (staged / "vmlinux").write_bytes(extract_vmlinux((root / "boot").glob("vmlinuz-*")))
        modules = modules_in_order(root / "lib/modules" / version)
        (staged / "modules").mkdir()
        for m in modules:  # kept, for an initramfs made anew when the init script changes
            shutil.copy(m, staged / "modules" / m.name)
        write_initramfs(staged / INITRAMFS, modules)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)


def _file_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return "dynamic" if b"ld-linux" in head else "static"


def extract_vmlinux(candidates: Iterator[Path]) -> bytes:
    """The ELF ``vmlinux`` inside an xz-compressed ``bzImage`` (Debian's ``CONFIG_KERNEL_XZ``)."""
    for path in candidates:
        data = path.read_bytes()
        at = data.find(b"\xfd7zXZ\x00")
        while at >= 0:
            with contextlib.suppress(lzma.LZMAError):
                out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
                if out.startswith(b"\x7fELF"):
                    return out
            at = data.find(b"\xfd7zXZ\x00", at + 1)
    raise VMUnavailable("no xz-compressed vmlinux found in the kernel package")


def modules_in_order(moddir: Path) -> list[Path]:
    """:data:`MODULES` and their dependencies, each after what it depends on."""
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []

    def add(name: str) -> None:
        path = by_name.get(name.replace("-", "_"))
        if path is None:  # built in
            return
        if path in order:
            return
        found = re.search(rb"\x00depends=([^\x00]*)\x00", path.read_bytes())
        for dep in found.group(1).decode().split(",") if found else []:
            if dep:
                add(dep)
        if path not in order:
            order.append(path)

    for name in MODULES:
        add(name)
    return order


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "memwarden-vm: insmod $m failed"; done
work=$(sed -n 's/.*mw\.work=\([^ ]*\).*/\1/p' /proc/cmdline)
agent=$(sed -n 's/.*mw\.agent=\([^ ]*\).*/\1/p' /proc/cmdline)
repo=$(sed -n 's/.*mw\.repo=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower \
  || echo "memwarden-vm: no host root"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || echo "memwarden-vm: no overlay"
N=/newroot
mount -t proc proc $N/proc
mount -t sysfs sysfs $N/sys
mount -t devtmpfs devtmpfs $N/dev
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts devpts $N/dev/pts
mount -t tmpfs -o mode=1777 shm $N/dev/shm
mount -t tmpfs -o mode=1777 tmp $N/tmp
mount -t tmpfs -o mode=0755 run $N/run
mount -t cgroup2 -o nsdelegate cgroup2 $N/sys/fs/cgroup
if [ -n "$repo" ]; then
  mkdir -p $N$repo
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 repo $N$repo \
    || echo "memwarden-vm: no repo share"
fi
mkdir -p $N$work
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work $N$work || echo "no work share"
ip link set lo up
port=$(ls /sys/class/virtio-ports/ 2>/dev/null | head -n 1)
echo "memwarden-vm: up, agent on /dev/$port"
chroot $N /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root \
  LANG=C.UTF-8 python3 $agent /dev/$port
echo "memwarden-vm: agent ended"
sync
poweroff -f
"""


#: The initramfs is named after what goes into it: a changed init script makes a new one.
INITRAMFS = (
    "initramfs-" + hashlib.sha256((INIT + ",".join(MODULES)).encode()).hexdigest()[:12] + ".cpio"
)


def write_initramfs(path: Path, modules: Sequence[Path]) -> None:
    """A ``newc`` cpio archive: busybox, the modules and ``/init``."""
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot"):
        entries.append((d, 0o040755, b""))
    entries.append(("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    for m in modules:
        entries.append((f"modules/{m.name}", 0o100644, m.read_bytes()))
    order = "\n".join(m.name for m in modules) + "\n"
    entries.append(("modules/order", 0o100644, order.encode()))
    with open(path, "wb") as out:
        for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
            raw = name.encode() + b"\x00"
            fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
            out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + raw)
            out.write(b"\x00" * (-(110 + len(raw)) % 4) + data + b"\x00" * (-len(data) % 4))


# --------------------------------------------------------------------- the VM
@dataclass
class Result:
    """One command's end in the guest."""

    rc: int
    out: str
    err: str
    seconds: float

    def check(self) -> Result:
        if self.rc != 0:
            raise AssertionError(f"guest command failed ({self.rc}):\n{self.out}\n{self.err}")
        return self


class VM:
    """A booted guest: :meth:`run` a command in it; :meth:`close` powers it off."""

    def __init__(self, img: Image, work: Path, accel: str | None = None) -> None:
        self.image = img
        self.work = work
        self.dir = Path(tempfile.mkdtemp(prefix="memwarden-vm-"))
        self.console = self.dir / "console.log"
        self.sock_path = self.dir / "agent.sock"
        self.accel = accel or os.environ.get("MEMWARDEN_VM_ACCEL", "")
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.boot_seconds = 0.0

    def _argv(self, accel: str) -> list[str]:
        cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else [
            "-accel", "tcg,thread=multi", "-cpu", "max"]  # fmt: skip
        share = "local,security_model=none,multidevs=remap"
        # The guest mounts fresh tmpfs on /tmp, /run and /dev/shm: a checkout there (a CI
        # clone in /tmp) is shared on its own, read-only, at its own path.
        repo, hidden = str(REPO), ("/tmp", "/run", "/dev/shm")
        repo_share = []
        if any(repo == h or repo.startswith(h + "/") for h in hidden):
            repo_share = ["-virtfs", f"{share},path={repo},mount_tag=repo,readonly=on"]
        return [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *cpu, "-m", str(MEMORY_MB), "-smp", str(CPUS),
            "-kernel", str(self.image.vmlinux), "-initrd", str(self.image.initramfs),
            "-append", f"{CMDLINE} mw.work={self.work} mw.agent={HERE / 'vm_agent.py'}"
            + (f" mw.repo={repo}" if repo_share else ""),
            "-serial", f"file:{self.console}",
            "-virtfs", f"{share},path=/,mount_tag=hostroot,readonly=on",
            "-virtfs", f"{share},path={self.work},mount_tag=work",
            *repo_share,
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={self.sock_path},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=agent",
        ]  # fmt: skip

    def boot(self) -> VM:
        accels = [self.accel] if self.accel else (["kvm", "tcg"] if _kvm_usable() else ["tcg"])
        problems = []
        for accel in accels:
            trial = accel == "kvm" and len(accels) > 1
            try:
                self._boot(accel, KVM_TRIAL if trial else BOOT_TIMEOUT)
                self.accel = accel
                return self
            except (OSError, TimeoutError, RuntimeError) as exc:
                problems.append(f"{accel}: {exc}")
                self._stop()
                if trial:  # not again on this host kernel
                    KVM_FAILED.parent.mkdir(parents=True, exist_ok=True)
                    KVM_FAILED.write_text(f"{exc}\n")
        raise RuntimeError("the VM did not boot: " + "; ".join(problems) + self.tail())

    def _boot(self, accel: str, timeout: float) -> None:
        started = time.monotonic()
        self.console.write_bytes(b"")
        self.proc = subprocess.Popen(
            self._argv(accel), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = started + timeout
        self.sock = socket.socket(socket.AF_UNIX)
        while True:  # qemu binds the socket, then listens
            self._alive_until(deadline)
            try:
                self.sock.connect(str(self.sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        self.sock.settimeout(0.5)
        while True:  # the agent answers "hello" once it runs
            self._alive_until(deadline)
            self.sock.sendall(b'{"hello": 1}\n')
            line = self._line(time.monotonic() + 1.0)
            if line is not None and json.loads(line).get("hello"):
                break
        self.boot_seconds = time.monotonic() - started

    def _alive_until(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            raise RuntimeError(f"qemu exited with {self.proc.returncode}: {out.strip()}")
        if time.monotonic() > deadline:
            raise TimeoutError("no answer from the guest agent in time")

    def _line(self, deadline: float) -> str | None:
        assert self.sock is not None
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                return None
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise RuntimeError("the guest agent hung up")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def run(
        self,
        argv: Sequence[str] | str,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Run ``argv`` (a string: ``sh -c``) in the guest and wait for it."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        assert self.sock is not None and self.proc is not None
        req = {"argv": list(argv), "timeout": timeout, "env": dict(env or {}), "cwd": cwd}
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout + 30
        while True:
            self._alive_until(deadline)
            line = self._line(min(deadline, time.monotonic() + 1.0))
            if line is None:
                continue
            answer = json.loads(line)
            if "rc" in answer:
                return Result(answer["rc"], answer["out"], answer["err"], answer["seconds"])

    def python(self, code: str, timeout: float = 120.0, **kw: object) -> Result:
        """Run ``code`` with the project's own Python (its venv) in the guest."""
        return self.run([sys.executable, "-c", code], timeout=timeout, **kw)  # type: ignore[arg-type]

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.console.read_text(errors="replace").splitlines()
            return "\n--- guest console (last lines) ---\n" + "\n".join(text[-lines:])
        return ""

    def close(self) -> None:
        if self.sock is not None and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.sock.sendall(b'{"quit": 1}\n')
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        self._stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        with contextlib.suppress(OSError):
            self.sock_path.unlink()


def _kvm_usable() -> bool:
    """/dev/kvm is there and has not failed a boot on this host kernel before."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and not KVM_FAILED.exists()


def unavailable() -> str | None:
    """Why no VM can run here, or None."""
    if not shutil.which(QEMU):
        return f"no {QEMU} (apt-get install qemu-system-x86)"
    if not os.path.exists(BUSYBOX):
        return "no busybox (apt-get install busybox-static)"
    return None


@contextlib.contextmanager
def booted(work: Path) -> Iterator[VM]:
    """A booted VM sharing ``work``; powered off at the end."""
    reason = unavailable()
    if reason:
        raise VMUnavailable(reason)
    vm = VM(image(), work)
    try:
        yield vm.boot()
    finally:
        vm.close()


def main(args: Sequence[str]) -> int:
    if args[:1] == ["build"]:
        try:
            img = image()
        except VMUnavailable as exc:
            print(f"memwarden-vm: {exc}", file=sys.stderr)
            return 1
        print(f"memwarden-vm: kernel {img.version} cached in {img.vmlinux.parent}")
        return 0
    if args[:1] == ["shell"]:
        args = args[1:]
        timeout = 600.0
        if args[:1] == ["--timeout"]:
            timeout, args = float(args[1]), args[2:]
        with tempfile.TemporaryDirectory() as work, booted(Path(work)) as vm:
            print(f"booted in {vm.boot_seconds:.1f}s ({vm.accel})", file=sys.stderr)
            r = vm.run(" ".join(args) or "cat /proc/self/cgroup; uname -r", timeout=timeout)
            print(r.out, end="")
            print(r.err, end="", file=sys.stderr)
            return r.rc
    print("usage: cgroup2_vm.py build | shell [--timeout S] [COMMAND]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
