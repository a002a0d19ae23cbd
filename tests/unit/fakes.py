"""Fakes shared by the root-free unit tests (the style of csi-driver-nfs's fake mounter):

* :class:`MemoryPool` — a node-local pool in memory (no devices: the controller side);
  :class:`DeviceMemoryPool` attaches its volumes as block devices of a :class:`FakeSystem`;
  :class:`NetworkMemoryPool` is a shared pool whose volumes nodes mount over the network.
* :class:`FakeSystem` — the host: every mount, unmount, mkfs, fsck, growth and device
  query is an in-memory record (``calls``, ``table``), and failures are injected per
  method (``fail``). Node paths are still resolved by the real :meth:`System.node_path`
  beneath a temporary directory, and mount points are created there, so the servicers'
  path checks (links, FIFOs, missing directories) run for real; no command ever runs.
* :class:`FakeContext` and :func:`call` — a servicer called as the server's interceptor
  calls it: a typed error becomes ``context.abort(code, message)`` through the one table
  of :mod:`csi.errors`, raised here as :class:`RpcAbort`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import pytest

from csi._proto import csi_pb2
from csi.errors import CommandFailed, FailedPrecondition, FlotillaError, NotFound, status_code
from csi.pools.access import Access, NetworkAccess
from csi.pools.base import (
    Capacity,
    Condition,
    Pool,
    Snapshot,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
    parse_id,
)
from csi.system import MountInfo, NodePath, System

Mode = csi_pb2.VolumeCapability.AccessMode
RWO = Mode.SINGLE_NODE_WRITER
RWX = Mode.MULTI_NODE_MULTI_WRITER


def cap(kind: str = "mount", mode: Any = RWO, fs_type: str = "",
        flags: tuple[str, ...] = ()) -> csi_pb2.VolumeCapability:
    c = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
    if kind == "mount":
        c.mount.fs_type = fs_type
        c.mount.mount_flags.extend(flags)
    elif kind == "block":
        c.block.SetInParent()
    return c


GiB = 1 << 30
MiB = 1 << 20


class MemoryPool(Pool):
    """A node-local pool in memory; ``fail_create`` injects an error."""

    type = "memory"

    def __init__(self, name: str = "local", size: int = 100 * GiB) -> None:
        super().__init__(name, {"name": name, "type": "memory"})
        self.size = size
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.fail_create: Exception | None = None
        self.lock = threading.Lock()

    def start(self) -> None: ...

    def check(self) -> None: ...

    def create_volume(self, req: VolumeRequest) -> Volume:
        if self.fail_create is not None:
            raise self.fail_create
        with self.lock:
            found = self.find_volume(req.name)
            if found:
                check_compatible(found, req)
                return found
            if req.source and req.source.kind == "snapshot" and \
                    req.source.id not in self.snapshots:
                raise NotFound(req.source.id)
            vol = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                         size=req.size, fs_type=req.fs_type, source=req.source,
                         parameters=dict(req.parameters))
            self.volumes[vol.id] = vol
            return vol

    def delete_volume(self, volume_id: str) -> None:
        self.volumes.pop(volume_id, None)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        vol = self.volumes[volume_id]
        vol.size = max(vol.size, size)
        return vol

    def get_volume(self, volume_id: str) -> Volume | None:
        return self.volumes.get(volume_id)

    def find_volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes.values() if v.name == name), None)

    def list_volumes(self) -> list[Volume]:
        return list(self.volumes.values())

    def volume_condition(self, volume_id: str) -> Condition:
        return Condition(False, "ok")

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        found = self.find_snapshot(name)
        if found:
            return found
        vol = self.volumes[source_volume_id]
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size, parameters=dict(parameters))
        self.snapshots[snap.id] = snap
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.pop(snapshot_id, None)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.snapshots.get(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return next((s for s in self.snapshots.values() if s.name == name), None)

    def list_snapshots(self) -> list[Snapshot]:
        return list(self.snapshots.values())

    def capacity(self) -> Capacity:
        used = sum(v.size for v in self.volumes.values())
        return Capacity(size=self.size, used=used, provisioned=used,
                        available=self.size - used, volumes=len(self.volumes),
                        snapshots=len(self.snapshots))

    def attach(self, volume_id: str) -> str:
        return "/dev/null"

    def detach(self, volume_id: str) -> None: ...

    def device_of(self, volume_id: str) -> str | None:
        return None

    def refresh_device(self, volume_id: str) -> int:
        return self.volumes[volume_id].size


def uid(object_id: str) -> str:
    """The hex part of a volume or snapshot id."""
    parsed = parse_id(object_id)
    assert parsed is not None, object_id
    return parsed[2]


class DeviceMemoryPool(MemoryPool):
    """A :class:`MemoryPool` whose volumes attach as block devices of ``system`` (one
    device per volume, as a loop device or a thin LV would be); ``conditions`` sets a
    volume's condition as the pool reports it."""

    def __init__(self, system: FakeSystem, name: str = "local", size: int = 100 * GiB
                 ) -> None:
        super().__init__(name, size)
        self.system = system
        self.attached: dict[str, str] = {}  # volume id -> device
        self.conditions: dict[str, Condition] = {}

    def attach(self, volume_id: str) -> str:
        vol = self.volumes.get(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        device = self.attached.get(volume_id)
        if device is None:
            device = self.attached[volume_id] = f"/dev/fake-{uid(volume_id)}"
            self.system.devices[device] = vol.size
            self.system.calls.append(("attach", volume_id, device))
        return device

    def detach(self, volume_id: str) -> None:
        device = self.attached.pop(volume_id, None)
        if device is not None:
            self.system.devices.pop(device, None)
            self.system.calls.append(("detach", volume_id, device))

    def device_of(self, volume_id: str) -> str | None:
        return self.attached.get(volume_id)

    def refresh_device(self, volume_id: str) -> int:
        size = self.volumes[volume_id].size
        device = self.attached.get(volume_id)
        if device is not None:
            self.system.devices[device] = size
        return size

    def volume_condition(self, volume_id: str) -> Condition:
        return self.conditions.get(volume_id, Condition(False, "ok"))


class NetworkMemoryPool(MemoryPool):
    """A shared pool (as nfs): any node reaches it, multi-node modes, no raw block, no
    filesystem of its own to grow; nodes mount ``server:/export/volumes/<uid>``."""

    type = "memory-network"
    node_local = False
    multi_node = True
    network = True
    block = False
    node_expansion = False
    mount_options = ("vers=4.2",)
    mount_timeout = 7.0

    def __init__(self, name: str = "shared", size: int = 100 * GiB) -> None:
        super().__init__(name, size)

    def mount_source(self, volume_id: str) -> str:
        return f"server:/export/volumes/{uid(volume_id)}"

    def node_access(self, volume_id: str) -> Access:
        return NetworkAccess(self, volume_id)


def statvfs(size: int, used: int = 0) -> os.statvfs_result:
    """A statvfs of a filesystem of ``size`` bytes in 4 KiB blocks, ``used`` of them used,
    with one inode per 16 KiB, 10 of them used."""
    blocks, free = size // 4096, (size - used) // 4096
    files = size // 16384
    return os.statvfs_result((4096, 4096, blocks, free, free, files, files - 10,
                              files - 10, 0, 255))


class FakeSystem(System):
    """The host in memory. ``table`` is the mount table (what /proc/self/mountinfo
    would say), ``devices`` the block devices and their sizes, ``filesystems`` what mkfs
    wrote on each device (``fs_bytes``: the size the filesystem believes it has). Every
    side effect is appended to ``calls``; ``fail[method] = error`` makes the next call of
    that method raise it. ``stale`` mount points do not answer (a dead NFS server),
    ``broken`` ones read with the given I/O error, and devices in ``deleted_backing`` lost
    their backing file. Mount targets are resolved and checked as the real System does
    (a descriptor on exactly the checked place), so they must exist beneath a real
    directory; no command ever runs (:meth:`run` fails the test)."""

    def __init__(self) -> None:
        super().__init__(proc_root="/nonexistent/proc", sys_root="/nonexistent/sys")
        self.table: list[MountInfo] = []
        self.devices: dict[str, int] = {}
        self.filesystems: dict[str, str] = {}
        self.fs_bytes: dict[str, int] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, Exception] = {}
        self.stale: set[str] = set()
        self.broken: dict[str, str] = {}
        self.deleted_backing: set[str] = set()
        self._ids = itertools.count(100)
        self._minors: dict[str, str] = {}  # device or network source -> major:minor

    # ---- bookkeeping ----------------------------------------------------------------

    def _effect(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        err = self.fail.pop(name, None)
        if err is not None:
            raise err

    def effects(self, *names: str) -> list[tuple[Any, ...]]:
        """The recorded calls of these methods (all when none is named), in order."""
        return [c for c in self.calls if not names or c[0] in names]

    def _number(self, source: str, major: int) -> str:
        if source not in self._minors:
            self._minors[source] = f"{major}:{len(self._minors)}"
        return self._minors[source]

    @staticmethod
    def _real(target: str | NodePath) -> str:
        return target.real if isinstance(target, NodePath) else os.path.normpath(target)

    def _add(self, mount_point: str, source: str, fstype: str, major_minor: str,
             readonly: bool, root: str = "/", options: Sequence[str] = ()) -> None:
        extra = tuple(o for o in options if o and o not in ("ro", "rw"))
        self.table.append(MountInfo(
            mount_id=next(self._ids), major_minor=major_minor, root=root,
            mount_point=mount_point, options=("ro" if readonly else "rw", *extra),
            fstype=fstype, source=source, super_options=("rw",)))

    def mounted(self, path: str | os.PathLike[str]) -> list[MountInfo]:
        """The mounts at ``path``, bottom first."""
        real = os.path.normpath(os.fspath(path))
        return [m for m in self.table if m.mount_point == real]

    def run(self, argv: Sequence[str], timeout: float = 0, check: bool = True,
            input_text: str | None = None, fds: Sequence[int] = ()) -> Any:
        pytest.fail(f"FakeSystem was asked to run a command: {list(argv)}")

    # ---- mounts ---------------------------------------------------------------------

    def mounts(self) -> list[MountInfo]:
        return list(self.table)

    def mount(self, source: str, target: str | NodePath, fstype: str | None = None,
              options: Sequence[str] = (), timeout: float = 60.0) -> None:
        real = self._real(target)
        self._effect("mount", source, real, fstype, tuple(options))
        with self._fd_paths(target):  # the target is checked as the real mount is
            pass
        network = (fstype or "").startswith("nfs")
        self._add(real, source, fstype or "", self._number(source, 0 if network else 7),
                  "ro" in options, options=options)

    def bind_mount(self, source: str | NodePath, target: str | NodePath,
                   readonly: bool = False, options: Sequence[str] = ()) -> None:
        real = self._real(target)
        self._effect("bind_mount", self._real(source), real, readonly, tuple(options))
        with self._fd_paths(source, target):
            pass
        if isinstance(source, NodePath):  # a bind of a mounted filesystem
            staged = self.mount_at(source)
            assert staged is not None, f"bind of {source.real}, where nothing is mounted"
            self._add(real, staged.source, staged.fstype, staged.major_minor, readonly,
                      staged.root, options)
        else:  # a bind of a device node onto a file: mountinfo names devtmpfs
            self._add(real, "udev", "devtmpfs", "0:5", readonly,
                      "/" + os.path.basename(source), options)

    def umount(self, target: str | NodePath, timeout: float = 60.0) -> None:
        real = self._real(target)
        self._effect("umount", real)
        at = self.mounted(real)
        if not at:
            raise CommandFailed(["umount", real], 32, f"umount: {real}: not mounted.")
        self.table.remove(at[-1])

    def umount_network(self, target: str | NodePath, timeout: float = 10.0) -> None:
        real = self._real(target)
        self._effect("umount_network", real)
        at = self.mounted(real)
        if at:
            self.table.remove(at[-1])
        self.stale.discard(real)

    def path_alive(self, path: str | NodePath, timeout: float = 5.0) -> bool:
        return self._real(path) not in self.stale

    def statfs(self, path: str | NodePath, timeout: float = 5.0) -> os.statvfs_result | None:
        return None if self._real(path) in self.stale else statvfs(10 * GiB, GiB)

    # ---- files on mounted filesystems -----------------------------------------------

    def fstatvfs(self, p: NodePath) -> os.statvfs_result:
        super().fstatvfs(p)  # the checks of the real call (missing, a FIFO, ...)
        m = self.mount_at(p)
        size = self.fs_bytes.get(m.source, GiB) if m is not None else GiB
        return statvfs(size, size // 4)

    def read_error(self, p: NodePath) -> str | None:
        if p.real in self.broken:
            return self.broken[p.real]
        return super().read_error(p)

    # ---- devices and filesystems ----------------------------------------------------

    def loop_backing_file(self, device: str) -> str | None:
        name = f"/pool/volumes/{os.path.basename(device)}.img"
        return f"{name} (deleted)" if device in self.deleted_backing else name

    def device_size(self, device: str) -> int:
        if device not in self.devices:
            raise CommandFailed(["blockdev", "--getsize64", device], 1,
                                f"blockdev: cannot open {device}: No such file or directory")
        return self.devices[device]

    def flush_device(self, device: str) -> None:
        self._effect("flush_device", device)

    def probe_fs(self, device: str) -> str | None:
        return self.filesystems.get(device)

    def mkfs(self, device: str, fstype: str, options: Sequence[str] = ()) -> None:
        self._effect("mkfs", device, fstype)
        self.filesystems[device] = fstype
        self.fs_bytes[device] = self.devices[device]

    def fsck(self, device: str, fstype: str, force: bool = False) -> None:
        self._effect("fsck", device, fstype, force)

    def grow_fs(self, fstype: str, device: str, mount_point: str | None) -> None:
        self._effect("grow_fs", fstype, device, mount_point)
        if fstype == "xfs" and mount_point is None:
            raise FailedPrecondition("XFS grows only while mounted")
        self.fs_bytes[device] = self.devices[device]

    def fs_block_count(self, fstype: str, device: str) -> int | None:
        return self.fs_bytes.get(device) if fstype == "ext4" else None


# ---- calling a servicer as the server does --------------------------------------------


class RpcAbort(Exception):
    """What ``context.abort`` raises: the status code and the message the caller gets
    (``str()`` is the message, for ``pytest.raises(RpcAbort, match=...)``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class FakeContext:
    """The part of ``grpc.ServicerContext`` a servicer and the interceptor use."""

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise RpcAbort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None


R = TypeVar("R")


def call(method: Callable[[Any, Any], R], request: Any,
         context: FakeContext | None = None) -> R:
    """Call a servicer method as :class:`csi.server.RpcInterceptor` does: a typed error
    aborts the call with the code of :data:`csi.errors.STATUS_OF` and its message; any
    other exception is INTERNAL, "internal error: ..."."""
    ctx = context or FakeContext()
    try:
        return method(request, ctx)
    except RpcAbort:
        raise
    except FlotillaError as err:
        ctx.abort(status_code(err), str(err))
    except Exception as err:
        try:
            ctx.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")
        except RpcAbort as abort:
            raise abort from err
    raise AssertionError("unreachable: abort raises")


def expect(code: grpc.StatusCode, match: str, method: Callable[[Any, Any], Any],
           request: Any) -> RpcAbort:
    """Assert the call fails with ``code`` and a message matching ``match`` (re.search)."""
    ctx = FakeContext()
    with pytest.raises(RpcAbort, match=match) as info:
        call(method, request, ctx)
    assert info.value.code == code, f"{info.value.code.name}: {info.value.details}"
    assert ctx.code() == code and ctx.details() == info.value.details
    return info.value
