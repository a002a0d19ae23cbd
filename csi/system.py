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
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from csi.errors import (
    AlreadyExists,
    CommandFailed,
    CommandTimeout,
    FailedPrecondition,
    FlotillaError,
    InvalidArgument,
    NotFound,
    path_error,
)

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
#: errors of FICLONE that mean "this filesystem (or server) cannot clone": copy instead
NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                      errno.ENOSYS, errno.ENOTSUP})
COPY_CHUNK = 8 << 20
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
#: ioctl of <linux/loop.h>: struct loop_info64 of a loop device
LOOP_GET_STATUS64 = 0x4C05
#: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit, lo_number, lo_encrypt_type,
#: lo_encrypt_key_size, lo_flags, lo_file_name, lo_crypt_name, lo_encrypt_key, lo_init
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")
TIMEOUT_LVM = 120.0
#: how long an unmount refused as busy is retried (short-lived references) before the
#: caller hears FAILED_PRECONDITION
UMOUNT_BUSY_WAIT = 2.0

#: ``--config`` for every lvm command: no udev synchronisation or udev-made device nodes
#: (a node container and the test VM have no udev; LVM makes the /dev nodes itself), no
#: dmeventd, and no device list from udev or a devices file (scan /dev, honour filters)
LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 verify_udev_operations=0 monitoring=0} "
    "devices{obtain_device_list_from_udev=0 use_devicesfile=0} "
    "log{command_names=0 prefix=\"\"}"
)
#: the ``lvs`` fields :mod:`csi.pools.lvm` reads
LVM_LV_FIELDS = (
    "lv_name", "lv_attr", "lv_size", "lv_tags", "pool_lv", "origin", "lv_active",
    "lv_device_open", "lv_suspended", "lv_health_status", "data_percent",
    "metadata_percent", "lv_metadata_size", "lv_kernel_major", "lv_kernel_minor",
)


#: filesystems whose mount points a node path must never be resolved through: touching
#: them can hang on a dead server
NETWORK_FSTYPES = ("cifs", "smb3", "ceph", "glusterfs")


def is_network_fs(fstype: str) -> bool:
    return fstype in NETWORK_FSTYPES or fstype.startswith(("nfs", "fuse."))


@dataclass(frozen=True)
class NodePath:
    """A caller's path under an allowed root, resolved without following any symbolic
    link. Its parent directory is held open (``parent_fd``); the last component is known
    by ``name`` only and never followed. Every operation on it goes through
    :class:`System` and acts on exactly this place, whatever is renamed or linked later.

    ``real`` is where it is (the parent's real path + name), as mountinfo spells it."""

    given: str
    what: str
    real: str
    root: str
    parent_fd: int
    name: str

    @property
    def fd_path(self) -> str:
        """The path through the held parent, valid in this process and in children that
        inherit ``parent_fd`` (see :meth:`System.run`'s ``fds``)."""
        return f"/proc/self/fd/{self.parent_fd}/{self.name}"


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


def _kind(mode: int) -> str:
    """What a file is, for messages."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "missing" if mode == 0 else "an unknown kind of file"


def _require_mountable(p: NodePath, mode: int) -> None:
    """What is at ``p`` can carry a mount: a directory, a file (or a bound device node)."""
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise InvalidArgument(f"{p.what} {p.given!r} is {_kind(mode)}; a volume is "
                              "mounted on a directory or a regular file")


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
        fds: Sequence[int] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in its own process group; kill the group on timeout. ``fds``
        are inherited by the command under the same numbers (``/proc/self/fd/N``)."""
        args = [str(a) for a in argv]
        proc = subprocess.Popen(
            args,
            pass_fds=tuple(fds),
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

    def mount_at(self, path: str | NodePath) -> MountInfo | None:
        """The top-most mount whose mount point is exactly ``path``.

        Only the parent is resolved: touching ``path`` itself could hang on a mount of a
        dead NFS server."""
        if isinstance(path, NodePath):
            real = path.real
        else:
            norm = os.path.normpath(path)
            real = os.path.join(os.path.realpath(os.path.dirname(norm)),
                                os.path.basename(norm))
        found = None
        for m in self.mounts():
            if m.mount_point == real:
                found = m
        return found

    def mounts_below(self, path: NodePath) -> list[MountInfo]:
        """Mounts strictly inside ``path`` (a directory)."""
        prefix = path.real.rstrip("/") + "/"
        return [m for m in self.mounts() if m.mount_point.startswith(prefix)]

    def mounts_above(self, path: NodePath) -> list[MountInfo]:
        """Mounts on the directories between ``path``'s root and ``path`` (both left out)."""
        inner = {os.path.dirname(path.real)}
        d = os.path.dirname(path.real)
        while d.startswith(path.root.rstrip("/") + "/"):
            inner.add(d)
            d = os.path.dirname(d)
        inner.discard(path.root)
        return [m for m in self.mounts() if m.mount_point in inner]

    def is_mount_of(self, m: MountInfo, device: str) -> bool:
        """Is ``m`` a mount of ``device`` (a filesystem on it, or a bind of its node)?

        Names differ for device-mapper devices: mount(8) turns ``/dev/dm-3`` into
        ``/dev/mapper/<name>`` (as a filesystem's source and as the node it binds), so
        device numbers decide."""
        if m.source == device:
            return True
        if m.fstype == "devtmpfs" and m.root == "/" + os.path.basename(device):
            return True
        try:
            st = os.stat(device)
            if not stat.S_ISBLK(st.st_mode):
                return False
            if m.fstype == "devtmpfs":  # a bind of a device node: the target is that node
                bound = os.stat(m.mount_point)
                return stat.S_ISBLK(bound.st_mode) and bound.st_rdev == st.st_rdev
        except OSError:
            return False
        return m.major_minor == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    @contextlib.contextmanager
    def _fd_paths(self, *paths: str | NodePath) -> Iterator[tuple[list[str], list[int]]]:
        """Names for a command: a NodePath becomes ``/proc/self/fd/N`` of a descriptor
        opened (without following a link) on exactly the checked place; what is mounted
        there already is crossed into, as the kernel does for any path."""
        names: list[str] = []
        fds: list[int] = []
        try:
            for p in paths:
                if isinstance(p, NodePath):
                    fd = self._open_final(p)
                    fds.append(fd)
                    names.append(f"/proc/self/fd/{fd}")
                else:
                    names.append(p)
            yield names, fds
        finally:
            for fd in fds:
                os.close(fd)

    def _open_final(self, p: NodePath) -> int:
        try:
            fd = os.open(p.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=p.parent_fd)
        except OSError as err:
            raise path_error(err, p.what, p.given) from None
        try:
            _require_mountable(p, os.fstat(fd).st_mode)
        except InvalidArgument:
            os.close(fd)
            raise
        return fd

    def mount(
        self,
        source: str,
        target: str | NodePath,
        fstype: str | None = None,
        options: Sequence[str] = (),
        timeout: float = TIMEOUT_MOUNT,
    ) -> None:
        argv = ["mount", "--no-canonicalize"]
        if fstype:
            argv += ["-t", fstype]
        opts = [o for o in options if o]
        if opts:
            argv += ["-o", ",".join(opts)]
        with self._fd_paths(target) as (names, fds):
            self.run([*argv, source, *names], timeout=timeout, fds=fds)

    def bind_mount(
        self, source: str | NodePath, target: str | NodePath, readonly: bool = False,
        options: Sequence[str] = ()
    ) -> None:
        """Bind ``source`` onto ``target``; read-only binds need a remount in the kernel."""
        with self._fd_paths(source, target) as (names, fds):
            self.run(["mount", "--no-canonicalize", "--bind", *names], timeout=TIMEOUT_MOUNT,
                     fds=fds)
        extra = [o for o in options if o and o not in ("bind", "rw", "ro")]
        if readonly or extra:
            opts = ["remount", "bind", "ro" if readonly else "rw", *extra]
            try:
                # reached afresh: the bind now sits on top of what was the target
                with self._fd_paths(target) as (names, fds):
                    self.run(["mount", "--no-canonicalize", "-o", ",".join(opts), *names],
                             timeout=TIMEOUT_MOUNT, fds=fds)
            except CommandFailed:
                self.umount(target)
                raise

    def _held_path(self, target: str | NodePath) -> tuple[str, list[int]]:
        if isinstance(target, NodePath):
            return target.fd_path, [target.parent_fd]
        return target, []

    def umount(self, target: str | NodePath, timeout: float = TIMEOUT_MOUNT) -> None:
        """Unmount the top-most mount at ``target``. A NodePath is unmounted through its
        held parent, so a link put in its place cannot redirect the unmount."""
        name, fds = self._held_path(target)
        deadline = time.monotonic() + UMOUNT_BUSY_WAIT
        while True:
            try:
                self.run(["umount", "--no-canonicalize", name], timeout=timeout, fds=fds)
                return
            except CommandFailed as err:
                if "busy" not in err.stderr or isinstance(err, CommandTimeout):
                    raise
                # a lookup in flight (kubelet's stats beside its unpublish) holds the mount
                # for an instant; a process inside it or a mount below it does not go away
                if time.monotonic() > deadline:
                    raise FailedPrecondition(
                        f"{getattr(target, 'given', target)} is busy: a process or a "
                        "mount below it still uses it") from None
                time.sleep(0.05)

    def umount_network(self, target: str | NodePath, timeout: float = 10.0) -> None:
        """Unmount a network filesystem; a dead server gets a forced, then lazy, unmount
        instead of a hang."""
        try:
            self.umount(target, timeout=timeout)
        except (CommandFailed, FailedPrecondition) as err:
            log.warning("umount %s failed (%s); forcing a lazy unmount",
                        getattr(target, "given", target), err)
            name, fds = self._held_path(target)
            self.run(["umount", "--no-canonicalize", "-f", "-l", name], timeout=timeout,
                     fds=fds)

    def path_alive(self, path: str | NodePath, timeout: float = 5.0) -> bool:
        """Does ``path`` answer (statfs) within ``timeout``? False for a stale NFS handle
        or a server that does not respond; asked from a child that is killed on expiry,
        so a hung server never blocks the caller."""
        name, fds = self._held_path(path)
        try:
            self.run(["stat", "-f", "--", name], timeout=timeout, fds=fds)
        except CommandFailed:
            return False
        return True

    def statfs(self, path: str | NodePath, timeout: float = 5.0) -> os.statvfs_result | None:
        """statvfs() of ``path`` from a child with a timeout (None: no answer)."""
        name, fds = self._held_path(path)
        try:
            out = self.run(["stat", "-f", "--format", "%b %f %a %S %c %d", "--", name],
                           timeout=timeout, fds=fds).stdout.split()
        except CommandFailed:
            return None
        blocks, bfree, bavail, bsize, files, ffree = (int(x) for x in out)
        return os.statvfs_result((bsize, bsize, blocks, bfree, bavail, files, ffree, ffree,
                                  0, 255, 0))

    # ---- node paths: caller-supplied, resolved beneath a root, links never followed ----

    @contextlib.contextmanager
    def node_path(self, path: str, roots: Sequence[str], what: str,
                  create_parents: bool = False) -> Iterator[NodePath]:
        """Resolve ``path`` (already checked by :func:`csi.validation.check_path`) under
        the allowed root it names, one component at a time from the root's real
        directory, refusing every symbolic link and never entering a network
        filesystem's mount. Missing directories are created when ``create_parents``, and
        removed again when the body raises (a refused call changes nothing).

        Raises: InvalidArgument (outside the roots, a link, not a directory, inside a
        network mount), NotFound (a missing directory)."""
        norm = os.path.normpath(path)
        root_real, rel = self._root_of(norm, roots, what)
        if not rel:
            raise InvalidArgument(f"{what} {path!r} is an allowed root itself; it must be "
                                  "a path below it")
        parts = rel.split("/")
        network = {m.mount_point: m for m in self.mounts() if is_network_fs(m.fstype)}
        created: list[tuple[int, str]] = []  # (a held parent, the directory made in it)
        fd = os.open(root_real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        here = root_real
        try:
            for part in parts[:-1]:
                here = os.path.join(here, part)
                if here in network:
                    raise InvalidArgument(
                        f"{what} {path!r} is inside the {network[here].fstype} mount at "
                        f"{here}; node paths must not be inside a network filesystem")
                nxt, made = self._open_dir(fd, part, here, path, what, create_parents)
                if made:
                    created.append((os.dup(fd), part))
                os.close(fd)
                fd = nxt
            try:
                yield NodePath(path, what, os.path.join(here, parts[-1]), root_real, fd,
                               parts[-1])
            except BaseException:
                for parent, name in reversed(created):
                    with contextlib.suppress(OSError):  # no longer empty: keep it
                        os.rmdir(name, dir_fd=parent)
                raise
        finally:
            os.close(fd)
            for parent, _ in created:
                os.close(parent)

    @staticmethod
    def _root_of(norm: str, roots: Sequence[str], what: str) -> tuple[str, str]:
        for root in roots:
            real = os.path.realpath(root)
            for spelling in dict.fromkeys((os.path.normpath(root), real)):
                base = spelling.rstrip("/")
                if norm == spelling or norm.startswith(base + "/"):
                    return real, norm[len(base):].strip("/")
        raise InvalidArgument(
            f"{what} {norm!r} is outside the allowed roots ({', '.join(roots)}); "
            "add its root to allowed_roots in the pool config")

    @staticmethod
    def _open_dir(fd: int, part: str, here: str, path: str, what: str,
                  create: bool) -> tuple[int, bool]:
        """Open the directory ``part`` in ``fd`` without following a link; returns the
        descriptor and whether this call created the directory."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
        made = False
        for attempt in (0, 1):
            try:
                return os.open(part, flags, dir_fd=fd), made
            except FileNotFoundError:
                if not create or attempt:
                    raise NotFound(f"{what} {path!r}: directory {here} does not "
                                   "exist") from None
                try:
                    os.mkdir(part, 0o750, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
                except OSError as err:
                    raise path_error(err, what, path) from None
            except NotADirectoryError:
                try:
                    mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                except OSError:
                    mode = 0
                if stat.S_ISLNK(mode):
                    raise InvalidArgument(
                        f"{what} {path!r} passes through the symbolic link {here}; "
                        "Flotilla follows no links in node paths") from None
                raise InvalidArgument(f"{what} {path!r}: {here} is {_kind(mode)}, not a "
                                      "directory") from None
            except OSError as err:
                raise path_error(err, what, path) from None
        raise AssertionError("unreachable")

    def lstat(self, p: NodePath) -> os.stat_result | None:
        """The last component itself (a link is not followed); None when it is missing.
        Do not call it on a network mount point (it could hang): check mount_at first."""
        try:
            return os.stat(p.name, dir_fd=p.parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise path_error(err, p.what, p.given) from None

    def make_dir(self, p: NodePath) -> None:
        """Create the last component as a directory, or accept an existing directory."""
        try:
            os.mkdir(p.name, 0o750, dir_fd=p.parent_fd)
        except FileExistsError:
            self.require_kind(p, stat.S_ISDIR, "a directory")
        except OSError as err:
            raise path_error(err, p.what, p.given) from None

    def make_file(self, p: NodePath) -> None:
        """Create the last component as an empty regular file, or accept an existing one.
        Never opens anything that exists (a FIFO would block, a link would be followed)."""
        try:
            fd = os.open(p.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o640, dir_fd=p.parent_fd)
            os.close(fd)
        except FileExistsError:
            self.require_kind(p, stat.S_ISREG, "a regular file")
        except OSError as err:
            raise path_error(err, p.what, p.given) from None

    def require_kind(self, p: NodePath, test: Callable[[int], bool], want: str) -> None:
        st = self.lstat(p)
        if st is None:
            raise NotFound(f"{p.what} {p.given!r} does not exist")
        if not test(st.st_mode):
            cls: type[FlotillaError] = InvalidArgument if stat.S_ISLNK(st.st_mode) \
                else AlreadyExists
            raise cls(f"{p.what} {p.given!r} is {_kind(st.st_mode)}; it must be {want}")

    def remove(self, p: NodePath) -> None:
        """Remove the last component (an empty directory, a file, a link itself); a
        missing one is fine."""
        st = self.lstat(p)
        if st is None:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(p.name, dir_fd=p.parent_fd)
            else:
                os.unlink(p.name, dir_fd=p.parent_fd)
        except FileNotFoundError:
            return
        except OSError as err:
            raise path_error(err, p.what, p.given) from None

    def fstatvfs(self, p: NodePath) -> os.statvfs_result:
        """statvfs of what is at ``p`` (a local mount; never a link's target). Holds no
        descriptor on it beyond the call, so an unmount beside it is not refused as busy."""
        st = self.lstat(p)
        if st is None:
            raise NotFound(f"{p.what} {p.given!r} does not exist")
        _require_mountable(p, st.st_mode)
        try:
            return os.statvfs(p.fd_path)
        except OSError as err:
            raise path_error(err, p.what, p.given) from None

    def list_dir(self, p: NodePath) -> list[str]:
        """Names in the directory at ``p``. Raises OSError as the kernel gives it (EIO on
        a broken filesystem is the caller's to interpret)."""
        fd = os.open(p.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=p.parent_fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def read_error(self, p: NodePath) -> str | None:
        """Why the directory at ``p`` (a local mount) cannot be read, in the kernel's
        words, when its filesystem is broken (EIO, ESTALE, ENOTCONN, EUCLEAN); None when
        it reads. Any other failure is a path error (NotFound, InvalidArgument, ...)."""
        try:
            self.list_dir(p)
        except OSError as err:
            if err.errno in (errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EUCLEAN):
                return err.strerror or str(err)
            raise path_error(err, p.what, p.given) from None
        return None

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

    def dm_device(self, dm_name: str) -> str | None:
        """The block device of the active device-mapper device ``dm_name`` (found in
        sysfs): the kernel's ``/dev/dm-N``, which mountinfo shows for binds of it, else
        ``/dev/mapper/<name>``; None when no such device is active."""
        try:
            entries = sorted(os.listdir(os.path.join(self.sys_root, "block")))
        except FileNotFoundError:
            return None
        for entry in entries:
            if entry.startswith("dm-") and self._sys_read("block", entry, "dm",
                                                          "name") == dm_name:
                node = f"/dev/{entry}"
                return node if os.path.exists(node) else f"/dev/mapper/{dm_name}"
        return None

    def loop_devices_for(self, image: str, include_detaching: bool = True) -> list[str]:
        """Loop devices whose backing file is ``image`` (one sysfs read per device).

        ``include_detaching=False`` leaves out devices whose detach is pending (autoclear
        set by a ``losetup -d`` while something still held them open)."""
        found = []
        try:
            names = sorted(e.name for e in os.scandir(os.path.join(self.sys_root, "block"))
                           if e.name.startswith("loop"))
        except FileNotFoundError:
            return []
        for name in names:
            if not self.loop_backed_by("/dev/" + name, image):
                continue
            if not include_detaching and self.loop_detaching("/dev/" + name):
                continue
            found.append("/dev/" + name)
        return found

    def loop_backed_by(self, device: str, image: str) -> bool:
        """Is ``image`` the backing file of the loop device ``device``?

        sysfs's ``backing_file`` names the file as seen from the mount namespace that
        attached it: a loop the previous node plugin container attached reads as
        ``/volumes/<id>.img`` (relative to that container's mount) in its successor and on
        the host. So a path that differs is settled by the kernel's own record of the
        backing file's device and inode (LOOP_GET_STATUS64)."""
        backing = self._sys_read("block", os.path.basename(device), "loop", "backing_file")
        if backing is None:
            return False
        real = os.path.realpath(image)
        if backing.removesuffix(" (deleted)") == real:
            return True
        if backing.endswith(" (deleted)"):
            return False  # an inode number of a deleted file may be reused by a new one
        try:
            st = os.stat(real)
        except OSError:
            return False
        return self._loop_backing_id(device) == (st.st_dev, st.st_ino)

    def _loop_backing_id(self, device: str) -> tuple[int, int] | None:
        """(st_dev, st_ino) of a loop device's backing file, from the kernel."""
        try:
            fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        buf = bytearray(LOOP_INFO64.size)
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        except OSError:
            return None
        finally:
            os.close(fd)
        dev, ino = LOOP_INFO64.unpack(buf)[:2]
        # the kernel's new_encode_dev(): 12-bit major, 20-bit minor
        major, minor = (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
        return os.makedev(major, minor), ino

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

    @staticmethod
    def clone_or_copy(src: str, dst: str, clone: bool = True) -> Literal["clone", "copy"]:
        """Make the new file ``dst`` (never an existing one) hold ``src``'s data: shared
        extents (FICLONE, e.g. a server-side clone over NFSv4.2) where the filesystem can
        and ``clone`` is set, else a copy. ``src`` is never followed if it is a symlink."""
        fd_src = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if clone:
                    try:
                        fcntl.ioctl(fd_dst, FICLONE, fd_src)
                        return "clone"
                    except OSError as err:
                        if err.errno not in NO_CLONE:
                            raise
                size = os.fstat(fd_src).st_size
                while chunk := os.read(fd_src, COPY_CHUNK):
                    os.write(fd_dst, chunk)
                os.ftruncate(fd_dst, size)
                return "copy"
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

    # ---- process locks --------------------------------------------------------------

    @staticmethod
    def try_lock(path: str) -> int | None:
        """Take an exclusive ``flock`` on ``path`` (created 0600) without waiting: the
        descriptor that holds it until :meth:`unlock` or this process's exit, or None when
        another process holds it. OSError when the file cannot be created."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)

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
