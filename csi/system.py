"""Side effects on the host: commands, mounts, loop devices, filesystems, reflinks.

Everything that touches the kernel goes through a :class:`System` instance that is
injected into pools and servicers, so unit tests can swap in a fake. Every external
command runs with a timeout in its own process group; on expiry the whole group is
killed, so a hung ``mount`` or ``mkfs`` never blocks later calls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi.errors import CommandFailed, CommandTimeout, FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

# Default timeouts in seconds; each can be overridden per call.
TIMEOUT_SHORT = 30.0
TIMEOUT_MOUNT = 60.0
TIMEOUT_MKFS = 300.0
TIMEOUT_FSCK = 600.0
#: how long a killed command may take to go away before it is abandoned
KILL_GRACE = 5.0
#: how long a detach may stay pending (device held open elsewhere) before we move on
LOOP_DETACH_WAIT = 10.0
TIMEOUT_LVM = 120.0

#: ``--config`` for every lvm command: no udev synchronisation or udev-made device nodes
#: (a node container and the test VM have no udev; LVM makes the /dev nodes itself), no
#: dmeventd, and no device list from udev or a devices file (scan /dev, honour filters)
LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 verify_udev_operations=0 monitoring=0} "
    "devices{obtain_device_list_from_udev=0 use_devicesfile=0} "
    "log{command_names=0 prefix=\"\"}"
)
#: the ``lvs`` fields :mod:`csi.pools.lvmthin` reads
LVM_LV_FIELDS = (
    "lv_name", "lv_attr", "lv_size", "lv_tags", "pool_lv", "origin", "lv_active",
    "lv_device_open", "lv_suspended", "lv_health_status", "data_percent",
    "metadata_percent", "lv_metadata_size", "lv_kernel_major", "lv_kernel_minor",
)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    major_minor: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    result = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, _, right = line.partition(" - ")
        lf = left.split()
        rf = right.split()
        result.append(
            MountInfo(
                mount_id=int(lf[0]),
                major_minor=lf[2],
                root=_unescape(lf[3]),
                mount_point=_unescape(lf[4]),
                options=tuple(lf[5].split(",")),
                fstype=rf[0],
                source=_unescape(rf[1]) if len(rf) > 1 else "",
                super_options=tuple(rf[2].split(",")) if len(rf) > 2 else (),
            )
        )
    return result


def parse_size(value: str | int) -> int:
    """Parse ``10Gi``, ``512Mi``, ``1G``, ``4096`` into bytes."""
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"size {value} is negative")
        return value
    text = str(value).strip()
    units = {
        "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
        "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            mult = units[suffix]
            break
    else:
        number, mult = text, 1
    try:
        amount = float(number)
    except ValueError:
        raise InvalidArgument(
            f"cannot read size {value!r}: use bytes or a suffix Ki, Mi, Gi, Ti"
        ) from None
    if amount < 0:
        raise InvalidArgument(f"size {value!r} is negative")
    return int(amount * mult)


class System:
    """The host. Methods raise :class:`CommandFailed` (INTERNAL) unless noted."""

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys") -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root

    # ---- commands -------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        timeout: float = TIMEOUT_SHORT,
        check: bool = True,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in its own process group; kill the group on timeout."""
        args = [str(a) for a in argv]
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        try:
            out, err = proc.communicate(input_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.communicate(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                # Stuck in the kernel (uninterruptible sleep on a dead NFS server) or its
                # pipes held by an escaped grandchild: abandon it rather than block this
                # call and every later one; a daemon thread reaps it if it ever ends.
                threading.Thread(target=proc.wait, daemon=True).start()
                log.error("command did not die %.0fs after SIGKILL; abandoned: %s",
                          KILL_GRACE, args)
            log.warning("command timed out after %.0fs and was killed: %s", timeout, args)
            raise CommandTimeout(args, None, f"no answer within {timeout:.0f}s") from None
        result = subprocess.CompletedProcess(args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, err or out)
        return result

    # ---- mounts ---------------------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        with open(os.path.join(self.proc_root, "self/mountinfo")) as f:
            return parse_mountinfo(f.read())

    def mount_at(self, path: str) -> MountInfo | None:
        """The top-most mount whose mount point is exactly ``path``.

        Only the parent is resolved: touching ``path`` itself could hang on a mount of a
        dead NFS server."""
        norm = os.path.normpath(path)
        real = os.path.join(os.path.realpath(os.path.dirname(norm)), os.path.basename(norm))
        found = None
        for m in self.mounts():
            if m.mount_point == real:
                found = m
        return found

    def mount(
        self,
        source: str,
        target: str,
        fstype: str | None = None,
        options: Sequence[str] = (),
        timeout: float = TIMEOUT_MOUNT,
    ) -> None:
        argv = ["mount"]
        if fstype:
            argv += ["-t", fstype]
        opts = [o for o in options if o]
        if opts:
            argv += ["-o", ",".join(opts)]
        argv += [source, target]
        self.run(argv, timeout=timeout)

    def bind_mount(
        self, source: str, target: str, readonly: bool = False, options: Sequence[str] = ()
    ) -> None:
        """Bind ``source`` onto ``target``; read-only binds need a remount in the kernel."""
        self.run(["mount", "--bind", source, target], timeout=TIMEOUT_MOUNT)
        extra = [o for o in options if o and o not in ("bind", "rw", "ro")]
        if readonly or extra:
            opts = ["remount", "bind", "ro" if readonly else "rw", *extra]
            try:
                self.run(["mount", "-o", ",".join(opts), target], timeout=TIMEOUT_MOUNT)
            except CommandFailed:
                self.umount(target)
                raise

    def umount(self, target: str, timeout: float = TIMEOUT_MOUNT) -> None:
        self.run(["umount", target], timeout=timeout)

    def umount_network(self, target: str, timeout: float = 10.0) -> None:
        """Unmount a network filesystem; a dead server gets a forced, then lazy, unmount
        instead of a hang."""
        try:
            self.umount(target, timeout=timeout)
        except CommandFailed as err:
            log.warning("umount %s failed (%s); forcing a lazy unmount", target, err)
            self.run(["umount", "-f", "-l", target], timeout=timeout)

    def path_alive(self, path: str, timeout: float = 5.0) -> bool:
        """Does ``path`` answer (statfs) within ``timeout``? False for a stale NFS handle
        or a server that does not respond; asked from a child that is killed on expiry,
        so a hung server never blocks the caller."""
        try:
            self.run(["stat", "-f", "--", path], timeout=timeout)
        except CommandFailed:
            return False
        return True

    def statfs(self, path: str, timeout: float = 5.0) -> os.statvfs_result | None:
        """statvfs() of ``path`` from a child with a timeout (None: no answer)."""
        try:
            out = self.run(["stat", "-f", "--format", "%b %f %a %S %c %d", "--", path],
                           timeout=timeout).stdout.split()
        except CommandFailed:
            return None
        blocks, bfree, bavail, bsize, files, ffree = (int(x) for x in out)
        return os.statvfs_result((bsize, bsize, blocks, bfree, bavail, files, ffree, ffree,
                                  0, 255, 0))

    # ---- loop devices ---------------------------------------------------------------

    def _sys_read(self, *parts: str) -> str | None:
        try:
            fd = os.open(os.path.join(self.sys_root, *parts), os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.read(fd, 4096).decode(errors="replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)

    def loop_devices_for(self, image: str, include_detaching: bool = True) -> list[str]:
        """Loop devices whose backing file is ``image`` (one sysfs read per device).

        ``include_detaching=False`` leaves out devices whose detach is pending (autoclear
        set by a ``losetup -d`` while something still held them open)."""
        real = os.path.realpath(image)
        found = []
        try:
            names = sorted(e.name for e in os.scandir(os.path.join(self.sys_root, "block"))
                           if e.name.startswith("loop"))
        except FileNotFoundError:
            return []
        for name in names:
            backing = self._sys_read("block", name, "loop", "backing_file")
            if backing is None or backing.removesuffix(" (deleted)") != real:
                continue
            if not include_detaching and self.loop_detaching("/dev/" + name):
                continue
            found.append("/dev/" + name)
        return found

    def loop_detaching(self, device: str) -> bool:
        """Is a detach of ``device`` pending? (We never set autoclear otherwise.)"""
        return self._sys_read("block", os.path.basename(device), "loop", "autoclear") == "1"

    def loop_backing_file(self, device: str) -> str | None:
        return self._sys_read("block", os.path.basename(device), "loop", "backing_file")

    def loop_attach(self, image: str) -> str:
        """Attach ``image`` to a free loop device, or return the one already attached
        (never one whose detach is pending)."""
        existing = self.loop_devices_for(image, include_detaching=False)
        if existing:
            return existing[0]
        out = self.run(["losetup", "--find", "--show", image]).stdout.strip()
        if not out.startswith("/dev/"):
            raise CommandFailed(["losetup"], 0, f"unexpected output {out!r}")
        return out

    def loop_detach(self, device: str, wait: float = LOOP_DETACH_WAIT) -> bool:
        """Detach ``device`` and wait until the kernel has let it go.

        While another process holds the device open (a concurrent ``losetup --find``
        scanning devices, a ``blkid``), the kernel only marks it for detach on last
        close: wait for that, so a following DeleteVolume finds the image free. Returns
        False when the detach is still pending after ``wait`` seconds."""
        backing = self.loop_backing_file(device)
        try:
            self.run(["losetup", "--detach", device])
        except CommandFailed as err:
            if "No such device" in err.stderr or not os.path.exists(device):
                return True
            raise
        deadline = time.monotonic() + wait
        while backing is not None and self.loop_backing_file(device) == backing:
            if time.monotonic() > deadline:
                log.warning("detach of %s (%s) is still pending after %.0fs", device,
                            backing, wait)
                return False
            time.sleep(0.02)
        return True

    def loop_refresh(self, device: str) -> None:
        """Make the loop device pick up a new size of its backing file."""
        self.run(["losetup", "--set-capacity", device])

    def device_size(self, device: str) -> int:
        return int(self.run(["blockdev", "--getsize64", device]).stdout.strip())

    def flush_device(self, device: str) -> None:
        """Write back a block device's page cache (raw writes not yet on the backing file)."""
        fd = os.open(device, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- filesystems ----------------------------------------------------------------

    def probe_fs(self, device: str) -> str | None:
        """Filesystem type on ``device``, or None for a blank device."""
        res = self.run(
            ["blkid", "-p", "-u", "filesystem", "-o", "value", "-s", "TYPE", device],
            check=False,
        )
        if res.returncode == 2:  # nothing found
            return None
        if res.returncode != 0:
            raise CommandFailed(list(res.args), res.returncode, res.stderr)
        return res.stdout.strip() or None

    def mkfs(self, device: str, fstype: str, options: Sequence[str] = ()) -> None:
        if fstype == "xfs":
            argv = ["mkfs.xfs", "-q", "-m", "reflink=1", *options, device]
        elif fstype == "ext4":
            argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard", *options,
                    device]
        elif fstype == "btrfs":
            argv = ["mkfs.btrfs", "-q", *options, device]
        else:
            raise InvalidArgument(f"cannot create filesystem type {fstype!r}")
        self.run(argv, timeout=TIMEOUT_MKFS)

    def fsck(self, device: str, fstype: str, force: bool = False) -> None:
        """Check a filesystem before mounting; only fixes what is safe to fix."""
        if fstype != "ext4":
            return  # XFS and btrfs recover from their logs at mount
        argv = ["e2fsck", "-p", *(["-f"] if force else []), device]
        res = self.run(argv, timeout=TIMEOUT_FSCK, check=False)
        # 0: clean, 1: errors corrected. Anything else needs a person.
        if res.returncode not in (0, 1):
            raise FailedPrecondition(
                f"filesystem on {device} has errors e2fsck -p cannot fix (exit "
                f"{res.returncode}); run e2fsck by hand: {res.stdout.strip()[-300:]}"
            )

    def grow_fs(self, fstype: str, device: str, mount_point: str | None) -> None:
        """Grow a filesystem to its device. Online where the filesystem allows it."""
        if fstype == "xfs":
            if mount_point is None:
                raise FailedPrecondition("XFS grows only while mounted")
            self.run(["xfs_growfs", mount_point], timeout=TIMEOUT_MKFS)
        elif fstype == "ext4":
            self.run(["resize2fs", device], timeout=TIMEOUT_FSCK)
        elif fstype == "btrfs":
            if mount_point is None:
                raise FailedPrecondition("btrfs grows only while mounted")
            self.run(["btrfs", "filesystem", "resize", "max", mount_point],
                     timeout=TIMEOUT_MKFS)
        else:
            raise InvalidArgument(f"cannot grow filesystem type {fstype!r}")

    def fs_block_count(self, fstype: str, device: str) -> int | None:
        """Size in bytes the filesystem on an unmounted device believes it has."""
        if fstype != "ext4":
            return None
        out = self.run(["dumpe2fs", "-h", device]).stdout
        fields = {}
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return int(fields["Block count"]) * int(fields["Block size"])

    @contextlib.contextmanager
    def frozen(self, mount_point: str) -> Iterator[None]:
        """Freeze a mounted filesystem (flushes it; writes block) and always thaw it."""
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as err:
                if err.errno == errno.EBUSY:  # already frozen by someone else
                    yield
                    return
                raise
            try:
                yield
            finally:
                fcntl.ioctl(fd, FITHAW, 0)
        finally:
            os.close(fd)

    def thaw(self, mount_point: str) -> bool:
        """Thaw a frozen filesystem; False when it was not frozen."""
        fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            return True
        except OSError as err:
            if err.errno == errno.EINVAL:
                return False
            raise
        finally:
            os.close(fd)

    def fstrim(self, mount_point: str) -> None:
        self.run(["fstrim", mount_point], timeout=TIMEOUT_FSCK, check=False)

    # ---- files ----------------------------------------------------------------------

    def reflink(self, src: str, dst: str, mode: int = 0o600) -> None:
        """Make ``dst`` share all extents of ``src`` (FICLONE). O(extents), not O(data)."""
        fd_src = os.open(src, os.O_RDONLY)
        try:
            fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                fcntl.ioctl(fd_dst, FICLONE, fd_src)
                os.fsync(fd_dst)
            finally:
                os.close(fd_dst)
        finally:
            os.close(fd_src)

    def supports_reflink(self, directory: str) -> bool:
        """True when FICLONE works between two files in ``directory``."""
        a = os.path.join(directory, f".reflink-probe-{os.getpid()}-a")
        b = os.path.join(directory, f".reflink-probe-{os.getpid()}-b")
        try:
            with open(a, "wb") as f:
                f.write(b"flotilla")
            self.reflink(a, b)
            return True
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ENOTTY):
                return False
            raise
        finally:
            for p in (a, b):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    @staticmethod
    def fsync_dir(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write a file so that a crash leaves the old content or the new, never a mix."""
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self.fsync_dir(os.path.dirname(path) or ".")

    # ---- LVM ------------------------------------------------------------------------

    def lvm(self, command: str, *args: str, timeout: float = TIMEOUT_LVM,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``lvm <command> --config LVM_CONFIG <args>`` with a timeout."""
        return self.run(["lvm", command, f"--config={LVM_CONFIG}", *args], timeout=timeout,
                        check=check)

    def lvm_report(self, command: str, fields: Sequence[str], args: Sequence[str] = (),
                   timeout: float = TIMEOUT_LVM) -> list[dict[str, str]]:
        """Rows of ``lvs``/``vgs``/``pvs`` as dicts (JSON report, sizes in bytes)."""
        import json

        out = self.lvm(command, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "--options", ",".join(fields), *args, timeout=timeout).stdout
        try:
            report = json.loads(out)["report"]
        except (ValueError, KeyError, TypeError):
            raise CommandFailed(["lvm", command], 0, f"unreadable report: {out[-300:]}"
                                ) from None
        key = command.removesuffix("s")
        return [dict(row) for part in report for row in part.get(key, [])]
