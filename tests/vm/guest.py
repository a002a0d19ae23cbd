"""Run a shell script inside a small qemu guest that boots a Debian kernel (TCG).

The host kernel may lack device-mapper or NFS; a Debian ``linux-image`` package has both
as modules. :func:`run_in_guest` boots that kernel with a tiny busybox initramfs that
loads the requested modules, mounts the host's root read-only over 9p with a writable
tmpfs overlay on top, and ``chroot``s into it: the host's own Python, ``.venv``, lvm2,
csi-sanity and the repository run unchanged inside, at the same paths.

Protocol between host and guest: a *job directory* on the host is shared writable over
9p at ``/job``. The host writes ``job.sh``; the guest runs it (output to
``/job/output.log``), writes its exit status to ``/job/rc``, prints a marker line on the
serial console and powers off. qemu exits 0 whatever happened inside, so the host trusts
only the ``rc`` file (or the marker): a guest that crashed, hung or was killed yields
``returncode=None``, never success. qemu runs in its own process group under a hard
timeout and is killed by PID; scratch disks are sparse files deleted afterwards. Nothing
is mounted or attached on the host.

Assets come from ``scripts/vm-setup.sh`` (packages, kernel download); this module derives
the uncompressed kernel and the initramfs from them and caches both.

Command line (for people): ``python -m tests.vm.guest prepare`` builds the caches;
``python -m tests.vm.guest run [-m MODULE]... [-d SIZE]... SCRIPT`` runs a script.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("FLOTILLA_VM_CACHE", "/var/cache/flotilla/vm"))
SETUP_HINT = "run `scripts/vm-setup.sh` (or `scripts/setup.sh --test`) as root first"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"

#: always loaded: PCI virtio transport, virtio disks, 9p, overlayfs
BASE_MODULES = ("virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay")
#: module aliases that appear in ``softdep=`` lines, resolved to a module that provides them
ALIASES = {
    "crc32c": "crc32c_generic",
    "crypto-crc32c": "crc32c_generic",
    "crypto-md5": "md5",
    "sha256": "sha256_generic",
    "crypto-sha256": "sha256_generic",
    "blake2b-256": "blake2b_generic",
    "xxhash64": "xxhash_generic",
}
#: modules that need an algorithm at load time without declaring it (libcrc32c asks the
#: crypto API for crc32c while it initialises: the provider must be loaded first)
EXTRA_PRE = {"libcrc32c": ("crc32c_generic",)}
#: what the lvmthin tests need
LVM_MODULES = ("dm_thin_pool", "dm_snapshot", "loop", "ext4", "xfs")

MARKER = "FLOTILLA-GUEST-RC="

INIT = r"""#!/bin/busybox sh
# flotilla guest init: modules, host root over 9p + tmpfs overlay, chroot, run /job/job.sh
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "flotilla-init: $*"; }
arg() { sed -n "s/.*\bflotilla\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
finish() {
    echo "$1" > /mnt/job/rc 2>/dev/null
    sync
    echo "@MARKER@$1"
    poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 5
}
# load modules level by level, each level in parallel
while read -r level; do
    for m in $level; do
        ( insmod "/lib/modules/$m.ko" 2>/tmp/insmod.$m \
            || grep -q 'File exists' /tmp/insmod.$m \
            || say "insmod $m failed: $(cat /tmp/insmod.$m)" ) &
    done
    wait
done < /modules.levels
ip link set lo up 2>/dev/null
hostname flotilla-guest
mkdir -p /mnt/host /mnt/job /mnt/rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /mnt/host \
    || { say "cannot mount the host root over 9p"; finish 251; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 job /mnt/job \
    || { say "cannot mount the job directory over 9p"; finish 252; }
mount -t tmpfs -o mode=0755,size=$(arg tmpfs) rw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
# paths of the host that the guest must not see (/job/hide, one a line): whiteouts in the
# upper layer, made before the overlay is mounted
if [ -f /mnt/job/hide ]; then
    while read -r p; do
        case "$p" in /?*) ;; *) continue ;; esac
        mkdir -p "/mnt/rw/upper${p%/*}" && mknod "/mnt/rw/upper$p" c 0 0 \
            || { say "cannot hide $p"; finish 254; }
    done < /mnt/job/hide
fi
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work,xino=off \
    overlay /newroot || { say "cannot mount the overlay root"; finish 253; }
for d in proc sys dev run tmp job; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/lock /newroot/run/lvm
# /tmp stays the host's, seen through the writable overlay: a tmpfs there would hide a
# checkout under /tmp (the repository and its .venv must be where the host has them)
mount --bind /mnt/job /newroot/job
say "running job (timeout $(arg timeout)s)"
timeout -s KILL "$(arg timeout)" env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin \
    HOME=/root LANG=C.UTF-8 TERM=dumb FLOTILLA_IN_GUEST=1 \
    chroot /newroot /bin/sh -c 'cd /job && exec /bin/sh /job/job.sh' >/mnt/job/output.log 2>&1
finish $?
"""


class VMUnavailable(Exception):
    """The VM assets are missing or broken; the message says how to fix it."""


# ---- assets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def kernel() -> Kernel:
    """The cached Debian kernel that ``scripts/vm-setup.sh`` unpacked."""
    current = CACHE / "kernel" / "current"
    if not current.exists() or not (current.resolve() / ".complete").exists():
        raise VMUnavailable(f"no Debian kernel under {CACHE}/kernel: {SETUP_HINT}")
    root = current.resolve()
    k = Kernel(root.name, root)
    if not k.vmlinuz.exists() or not k.modules.is_dir():
        raise VMUnavailable(f"kernel cache {root} is incomplete: {SETUP_HINT}")
    return k


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def vmlinux(k: Kernel) -> Path:
    """The uncompressed ELF kernel (booted via PVH: saves seconds of decompression)."""
    out = k.root / "vmlinux"
    if out.exists():
        return out
    blob = k.vmlinuz.read_bytes()
    start = blob.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(blob[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            _atomic_write(out, elf)
            return out
        start = blob.find(b"\xfd7zXZ\x00", start + 1)
    raise VMUnavailable(f"no xz-compressed ELF kernel found in {k.vmlinuz}")


class ModuleIndex:
    """Kernel modules by name, with their dependencies read from ``.modinfo``."""

    DEPENDS = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")
    SOFTDEP = re.compile(rb"(?:^|\x00)softdep=pre: ([^\x00]*)\x00")

    def __init__(self, k: Kernel) -> None:
        self.paths: dict[str, Path] = {}
        for path in (k.modules / "kernel").rglob("*.ko"):
            self.paths[path.stem.replace("-", "_")] = path
        self._deps: dict[str, list[str]] = {}

    def _name(self, name: str) -> str | None:
        norm = ALIASES.get(name, name).replace("-", "_")
        return norm if norm in self.paths else None

    def deps(self, name: str) -> list[str]:
        if name not in self._deps:
            data = self.paths[name].read_bytes()
            found: list[str] = list(EXTRA_PRE.get(name, ()))
            for m in self.SOFTDEP.finditer(data):
                found += m.group(1).decode().split()
            for m in self.DEPENDS.finditer(data):
                found += [d for d in m.group(1).decode().split(",") if d]
            resolved = [n for n in (self._name(d) for d in found) if n is not None]
            self._deps[name] = list(dict.fromkeys(resolved))
        return self._deps[name]

    def levels(self, wanted: Iterable[str]) -> list[list[str]]:
        """Modules to load, grouped so each group only needs earlier groups."""
        level: dict[str, int] = {}
        visiting: set[str] = set()

        def visit(name: str) -> int:
            if name in level:
                return level[name]
            if name in visiting:
                raise VMUnavailable(f"module dependency cycle at {name}")
            visiting.add(name)
            lv = 1 + max((visit(d) for d in self.deps(name)), default=-1)
            visiting.discard(name)
            level[name] = lv
            return lv

        for name in wanted:
            resolved = self._name(name)
            if resolved is None:
                raise VMUnavailable(f"the guest kernel has no module {name!r}")
            visit(resolved)
        groups: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
        for name, lv in sorted(level.items()):
            groups[lv].append(name)
        return groups


def module_tree(k: Kernel) -> Path:
    """The kernel's whole module directory, indexed (``modules.dep``, ``modules.alias``)
    by busybox ``depmod`` once, so that busybox ``modprobe`` can load any module and its
    dependencies: a guest that bind-mounts it at ``/lib/modules/<version>`` (also under
    ``/proc/1/root``, where the kernel's ``request_module`` runs ``/sbin/modprobe``) has
    modules loaded on demand (``ip link add type veth``, ``nft``, ``mount -t nfs``)."""
    done = k.root / ".depmod-complete"
    if not done.exists():
        with open(k.root / ".depmod.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                subprocess.run([str(BUSYBOX), "depmod", "-b", str(k.root), k.version],
                               check=True, capture_output=True)
                done.touch()
    return k.modules


def _cpio_newc(entries: Sequence[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)) entries."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\x00" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))],
                                                   start=1):
        raw = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(raw)
        pad()
        out.extend(data)
        pad()
    return bytes(out)


def _has_interpreter(elf: bytes) -> bool:
    """Does this ELF64 executable name a dynamic loader (PT_INTERP)?"""
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    entsize = int.from_bytes(elf[0x36:0x38], "little")
    count = int.from_bytes(elf[0x38:0x3A], "little")
    return any(int.from_bytes(elf[phoff + i * entsize:phoff + i * entsize + 4], "little") == 3
               for i in range(count))


def initramfs(k: Kernel, modules: Iterable[str] = ()) -> Path:
    """A cached initramfs with busybox, ``INIT`` and the modules (plus dependencies)."""
    if not BUSYBOX.exists():
        raise VMUnavailable(f"{BUSYBOX} is missing (Debian package busybox-static): "
                            f"{SETUP_HINT}")
    index = ModuleIndex(k)
    levels = index.levels([*BASE_MODULES, *modules])
    init = INIT.replace("@MARKER@", MARKER)
    busybox = BUSYBOX.read_bytes()
    if _has_interpreter(busybox):
        raise VMUnavailable(f"{BUSYBOX} is dynamically linked; the initramfs needs the "
                            f"static one (Debian package busybox-static): {SETUP_HINT}")
    key = hashlib.sha256(repr((k.version, levels, init)).encode() + busybox).hexdigest()[:16]
    out = CACHE / "initramfs" / f"{k.version}-{key}.cpio"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, d, b"", (0, 0)) for name in ("bin", "dev", "lib", "lib/modules", "mnt", "proc",
                                            "sys", "tmp", "newroot")
    ]
    entries += [
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)),
        ("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)),
        ("bin/busybox", f | 0o755, busybox, (0, 0)),
        ("init", f | 0o755, init.encode(), (0, 0)),
        ("modules.levels", f | 0o644, "".join(" ".join(g) + "\n" for g in levels).encode(),
         (0, 0)),
    ]
    for group in levels:
        for name in group:
            entries.append((f"lib/modules/{name}.ko", f | 0o644,
                            index.paths[name].read_bytes(), (0, 0)))
    _atomic_write(out, _cpio_newc(entries))
    return out


def prepare(modules: Iterable[str] = LVM_MODULES) -> tuple[Path, Path]:
    """Build (or find) the uncompressed kernel and an initramfs; fail with the fix."""
    if shutil.which(QEMU) is None:
        raise VMUnavailable(f"{QEMU} is not installed (Debian package qemu-system-x86): "
                            f"{SETUP_HINT}")
    k = kernel()
    return vmlinux(k), initramfs(k, modules)


# ---- running ----------------------------------------------------------------------------


@dataclass
class GuestResult:
    """What came back from a guest. ``returncode`` is None when the guest never reported
    one (crash, hang, timeout): only an ``rc`` of 0 is success."""

    returncode: int | None
    timed_out: bool
    seconds: float
    console: str
    output: str
    jobdir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self, tail: int = 6000) -> str:
        if self.timed_out:
            what = f"guest timed out after {self.seconds:.0f}s and qemu was killed"
        elif self.returncode is None:
            what = "guest reported no exit status (kernel panic, crash or init failure)"
        else:
            what = f"guest job exited {self.returncode}"
        return (f"{what}\n--- job output (tail) ---\n{self.output[-tail:]}\n"
                f"--- console (tail) ---\n{self.console[-2000:]}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_in_guest(
    script: str,
    *,
    modules: Sequence[str] = (),
    disks: Sequence[int] = (),
    timeout: float = 600.0,
    memory_mib: int = 4096,
    cpus: int = 2,
    jobdir: Path | None = None,
    env: Mapping[str, str] | None = None,
    tmpfs_size: str = "75%",
    guest_timeout: float | None = None,
    cpu: str = "max",
    hide: Sequence[str] = (),
    ro_disks: Sequence[Path] = (),
) -> GuestResult:
    """Run ``script`` (POSIX sh, cwd ``/job``) as root in a fresh guest.

    ``modules``: kernel modules to load (dependencies follow). ``disks``: sizes in bytes
    of blank scratch disks, ``/dev/vda``, ``/dev/vdb``, ... in the guest. ``env``:
    variables exported to the script. ``jobdir``: a host directory for ``job.sh``,
    ``output.log``, ``console.log``, ``rc`` and whatever the script writes to ``/job``
    (a temporary one, removed afterwards, when omitted). ``timeout`` bounds the whole
    run (qemu is killed); the script itself is killed inside the guest after
    ``guest_timeout`` (default: 20 s before ``timeout``) so its output survives.
    ``hide``: absolute paths of the host's root that do not exist in the guest (whiteouts
    in the overlay, e.g. the state of a cluster running on the host). ``ro_disks``:
    existing image files attached read-only after the scratch disks (e.g. a filesystem
    of assets the guest would read too slowly over 9p).
    """
    vmlinux_path, initrd = prepare(modules)
    own_jobdir = jobdir is None
    job = Path(tempfile.mkdtemp(prefix="flotilla-guest-", dir="/var/tmp")) if jobdir is None \
        else jobdir
    job.mkdir(parents=True, exist_ok=True)
    for stale in ("rc", "output.log", "console.log", "hide"):
        (job / stale).unlink(missing_ok=True)
    if hide:
        (job / "hide").write_text("".join(f"{os.path.normpath(h)}\n" for h in hide))
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    (job / "job.sh").write_text(f"set -e\n{exports}{script}\n")
    diskdir = Path(tempfile.mkdtemp(prefix="flotilla-disks-", dir="/var/tmp"))
    in_guest = int(guest_timeout if guest_timeout is not None else max(10, timeout - 20))
    argv = [
        QEMU, "-machine", "pc", "-accel", "tcg,tb-size=256", "-cpu", cpu,
        "-smp", str(cpus), "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-monitor", "none", "-serial", f"file:{job / 'console.log'}",
        "-kernel", str(vmlinux_path), "-initrd", str(initrd),
        "-append", (f"console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable pci=noacpi "
                    f"mitigations=off random.trust_cpu=on flotilla.timeout={in_guest} "
                    f"flotilla.tmpfs={tmpfs_size}"),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=job,path={job},security_model=none",
        "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
    ]
    try:
        for i, size in enumerate(disks):
            disk = diskdir / f"disk{i}.img"
            with open(disk, "wb") as f:
                f.truncate(size)
            argv += ["-drive", f"file={disk},format=raw,if=none,id=d{i},cache=unsafe",
                     "-device", f"virtio-blk-pci,drive=d{i},serial=flotilla-disk{i}"]
        for i, image in enumerate(ro_disks, start=len(disks)):
            argv += ["-drive", f"file={image},format=raw,if=none,id=d{i},readonly=on",
                     "-device", f"virtio-blk-pci,drive=d{i},serial=flotilla-disk{i}"]
        started = time.monotonic()
        timed_out = False
        with open(job / "qemu.log", "wb") as qlog:
            # setpriv execs qemu with a parent-death signal: a killed test run never
            # leaves a guest behind
            proc = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", *argv],
                                    stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            with _running_lock:
                _running.add(proc)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc)
                with _running_lock:
                    _running.discard(proc)
        seconds = time.monotonic() - started
    finally:
        shutil.rmtree(diskdir, ignore_errors=True)
    console = _read(job / "console.log") + _read(job / "qemu.log")
    rc_text = _read(job / "rc").strip()
    returncode: int | None = int(rc_text) if rc_text.lstrip("-").isdigit() else None
    if returncode is None:
        marks = re.findall(re.escape(MARKER) + r"(-?\d+)", console)
        returncode = int(marks[-1]) if marks else None
    result = GuestResult(returncode=returncode, timed_out=timed_out, seconds=seconds,
                         console=console, output=_read(job / "output.log"), jobdir=job,
                         argv=argv)
    if own_jobdir:
        shutil.rmtree(job, ignore_errors=True)
    return result


_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill a qemu (its own process group, by PID) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_all() -> None:
    """Kill every guest this process still runs (end of a test session)."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        _kill(proc)


# ---- several guests at once ------------------------------------------------------------


@dataclass(frozen=True)
class GuestJob:
    """A guest run to schedule: :func:`run_in_guest` arguments and a duration estimate
    (longest jobs start first)."""

    script: str
    modules: tuple[str, ...] = ()
    disks: tuple[int, ...] = ()
    timeout: float = 600.0
    env: tuple[tuple[str, str], ...] = ()
    guest_timeout: float | None = None
    expected_seconds: float = 60.0
    memory_mib: int = 4096
    cpus: int = 2
    tmpfs_size: str = "75%"
    hide: tuple[str, ...] = ()
    ro_disks: tuple[Path, ...] = ()


def parallelism() -> int:
    """Guests run at once: ``FLOTILLA_VM_PARALLEL``, else 2 (a guest keeps about one host
    core busy: mostly single-threaded work with I/O waits)."""
    return max(1, int(os.environ.get("FLOTILLA_VM_PARALLEL", "2")))


class GuestScheduler:
    """Runs :class:`GuestJob` s on a few worker threads; each job's jobdir is
    ``base/<name>``. :meth:`shutdown` kills whatever still runs."""

    def __init__(self, base: Path, workers: int | None = None) -> None:
        self.base = base
        self.executor = ThreadPoolExecutor(max_workers=workers or parallelism(),
                                           thread_name_prefix="guest")
        self.futures: dict[str, Future[GuestResult]] = {}

    def submit(self, name: str, job: GuestJob) -> Future[GuestResult]:
        if name not in self.futures:
            self.futures[name] = self.executor.submit(
                run_in_guest, job.script, modules=job.modules, disks=job.disks,
                timeout=job.timeout, jobdir=self.base / name, env=dict(job.env),
                guest_timeout=job.guest_timeout, memory_mib=job.memory_mib, cpus=job.cpus,
                tmpfs_size=job.tmpfs_size, hide=job.hide, ro_disks=job.ro_disks)
        return self.futures[name]

    def submit_all(self, jobs: Mapping[str, GuestJob]) -> None:
        for name, job in sorted(jobs.items(), key=lambda kv: -kv[1].expected_seconds):
            self.submit(name, job)

    def shutdown(self) -> None:
        for future in self.futures.values():
            future.cancel()
        kill_all()
        self.executor.shutdown(wait=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build the uncompressed kernel and initramfs caches")
    run = sub.add_parser("run", help="run a shell script in a guest")
    run.add_argument("-m", "--module", action="append", default=[])
    run.add_argument("-d", "--disk", action="append", default=[], type=int,
                     help="size in bytes of a scratch disk (repeatable)")
    run.add_argument("-t", "--timeout", type=float, default=600.0)
    run.add_argument("script")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            kernel_path, initrd = prepare()
            print(f"kernel {kernel_path}\ninitramfs {initrd}")
            return 0
        result = run_in_guest(args.script, modules=args.module, disks=args.disk,
                              timeout=args.timeout)
    except VMUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(result.output)
    print(f"[guest] {result.describe(0).splitlines()[0]} in {result.seconds:.1f}s",
          file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
