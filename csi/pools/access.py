"""How a node reaches a volume: the :class:`Access` its pool returns
(:meth:`csi.pools.base.Pool.node_access`).

* :class:`AttachedAccess` (the default): the pool makes the volume a block device on this
  node (:meth:`~csi.pools.base.Pool.attach`: a loop device, a thin LV). Stage formats it
  when blank and mounts it at the staging path; publish binds that mount (or, for a raw
  block volume, the device node) onto the target.
* :class:`NetworkAccess`: the node mounts the volume's export
  (:meth:`~csi.pools.base.Pool.mount_source`, e.g. ``server:/share/volumes/<uid>``) at
  each target, with the pool's ``mount_options`` and ``mount_timeout``; stage has nothing
  to do, and there is no raw block.

The node servicer validates a request and lends the access what the servicer owns
through a :class:`NodeHost`: the volume's try-lock, caller paths resolved beneath the
allowed roots, the checks of a new mount point, the ownership check of a mount found.
The access holds what differs between the two ways, so the servicer has no branch on a
pool's type. Every host side effect goes through the host's :class:`~csi.system.System`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from csi.errors import (
    AlreadyExists,
    CommandFailed,
    CommandTimeout,
    FailedPrecondition,
    FlotillaError,
    InvalidArgument,
)
from csi.faults import crashpoint
from csi.pools.base import Condition
from csi.system import MountInfo, NodePath, System, is_network_fs
from csi.validation import FS_TYPES

if TYPE_CHECKING:
    from csi.pools.base import Pool

log = logging.getLogger(__name__)

#: a filesystem smaller than its device by more than this is grown at stage
GROW_SLACK = 1 << 20


class NodeHost(Protocol):
    """What the node servicer lends an access (:class:`csi.node.NodeService`)."""

    system: System

    def hold(self, volume_id: str) -> AbstractContextManager[None]:
        """The volume's try-lock. Raises: Aborted."""

    def path(self, path: str, what: str, create_parents: bool = False
             ) -> AbstractContextManager[NodePath]:
        """``path`` resolved beneath its allowed root (:meth:`System.node_path`)."""

    def path_if_there(self, path: str, what: str
                      ) -> AbstractContextManager[NodePath | None]:
        """Like :meth:`path`, but None when a directory on the way is missing."""

    def new_place(self, p: NodePath, is_file: bool) -> AbstractContextManager[None]:
        """Make ``p`` a mount point (checked: no mount below it, not inside a volume);
        remove it again when the body raises and nothing got mounted there."""

    def check_owner(self, volume_id: str, m: MountInfo, at: NodePath) -> None:
        """Raise unless the mount ``m`` at ``at`` is the volume's (NotFound,
        FailedPrecondition)."""


@dataclass(frozen=True)
class StageRequest:
    """A validated NodeStageVolume of the access's volume."""

    staging_path: str  # within the allowed roots, not resolved yet
    block: bool
    mount_flags: tuple[str, ...]
    #: the filesystem to make or expect; raises InvalidArgument for one not served. Only
    #: an access that makes a filesystem asks.
    fs_type: Callable[[], str]


@dataclass(frozen=True)
class PublishRequest:
    """A validated NodePublishVolume of the access's volume; the servicer holds the
    volume's lock and has resolved ``target`` (its parent directories exist)."""

    target: NodePath
    staging_path: str  # within the allowed roots, not resolved yet
    block: bool
    readonly: bool
    mount_flags: tuple[str, ...]


@dataclass(frozen=True)
class VolumeStats:
    """What NodeGetVolumeStats reports of a mounted volume: its condition, and the usage
    of its filesystem (``fs``) or the size of its raw block device (``device_bytes``)."""

    condition: Condition
    fs: os.statvfs_result | None = None
    device_bytes: int | None = None


@contextlib.contextmanager
def caller_flags(flags: tuple[str, ...], what: str) -> Iterator[None]:
    """A mount that fails while the request named mount flags failed because of them as
    far as the caller can tell: INVALID_ARGUMENT, with mount's own words."""
    try:
        yield
    except CommandFailed as err:
        if not flags or isinstance(err, CommandTimeout):
            raise
        raise InvalidArgument(f"{what} with mount flags {list(flags)} failed; check the "
                              f"StorageClass mountOptions: {err.stderr[-300:]}") from None


class Access(abc.ABC):
    """How this node reaches one volume of ``pool``. Made per call, cheaply and without
    I/O, for a volume that may not exist (any more): the methods find out.

    The servicer checks ids, paths and capabilities, and holds the volume's lock where
    a method says so; each method raises typed errors of :mod:`csi.errors`."""

    def __init__(self, pool: Pool, volume_id: str) -> None:
        self.pool = pool
        self.volume_id = volume_id

    @abc.abstractmethod
    def owns(self, system: System, m: MountInfo) -> bool:
        """Is the mount ``m`` this volume (its filesystem, a bind of it, its device node,
        or its export)?"""

    @abc.abstractmethod
    def stage(self, host: NodeHost, req: StageRequest) -> None:
        """NodeStageVolume (takes the volume's lock itself, where it needs it).

        Raises: InvalidArgument, AlreadyExists (another mount at the staging path),
        FailedPrecondition (another filesystem on the volume), Aborted, Internal."""

    @abc.abstractmethod
    def check_unstage(self, system: System, staging: NodePath | None) -> None:
        """Refuse NodeUnstageVolume while unstaging would break a live publish (lock held;
        ``staging`` None: the staging path does not exist, e.g. a raw block volume's).

        Raises: FailedPrecondition."""

    @abc.abstractmethod
    def detach(self) -> None:
        """The end of NodeUnstageVolume: undo what stage made beyond the staging mount
        (idempotent; lock held)."""

    @abc.abstractmethod
    def publish(self, host: NodeHost, req: PublishRequest) -> None:
        """NodePublishVolume at ``req.target`` (lock held).

        Raises: InvalidArgument, AlreadyExists (an incompatible mount at the target),
        FailedPrecondition (not staged), Internal."""

    @abc.abstractmethod
    def unmount(self, system: System, target: NodePath) -> None:
        """Unmount this volume's top-most mount at ``target`` (checked to be its own)."""

    @abc.abstractmethod
    def stats(self, system: System, p: NodePath, m: MountInfo) -> VolumeStats:
        """Usage and condition of the volume mounted at ``p`` (``m``, its own mount).
        Never hangs on a dead server; a broken filesystem is an abnormal condition."""

    @abc.abstractmethod
    def expand(self, host: NodeHost, p: NodePath, m: MountInfo) -> int:
        """NodeExpandVolume of the volume mounted at ``p``: make the node see its new
        size and grow what needs growing; returns the size. Takes the lock where needed.

        Raises: FailedPrecondition, Aborted, Internal."""


class AttachedAccess(Access):
    """The volume is a block device on this node (:meth:`Pool.attach`), formatted and
    mounted at the staging path, and bound from there onto each target."""

    def owns(self, system: System, m: MountInfo) -> bool:
        device = self.pool.device_of(self.volume_id)
        return device is not None and system.is_mount_of(m, device)

    # ---- stage ----------------------------------------------------------------------

    def stage(self, host: NodeHost, req: StageRequest) -> None:
        with host.hold(self.volume_id):
            if req.block:
                # the staging path is not used, but it is checked as unstage will check it
                with host.path_if_there(req.staging_path, "staging_target_path"):
                    self.pool.attach(self.volume_id)
                return
            fs_type = req.fs_type()
            with host.path(req.staging_path, "staging_target_path",
                           create_parents=True) as staging:
                self._stage(host, staging, fs_type, req.mount_flags)

    def _stage(self, host: NodeHost, staging: NodePath, fs_type: str,
               flags: tuple[str, ...]) -> None:
        system, pool, volume_id = host.system, self.pool, self.volume_id
        current = system.mount_at(staging)
        if current is not None:
            # staged already (a retry), or someone else's mount: nothing is attached for it
            device = pool.device_of(volume_id)
            if device is None or not system.is_mount_of(current, device):
                raise AlreadyExists(f"staging_target_path {staging.given} already has "
                                    f"{current.source} mounted")
            return
        was_attached = pool.device_of(volume_id) is not None
        with host.new_place(staging, is_file=False):
            device = pool.attach(volume_id)
            crashpoint("node.stage.attached")
            try:
                self._format_and_mount(system, device, staging, fs_type, flags)
            except BaseException:
                if not was_attached and system.mount_at(staging) is None:
                    with contextlib.suppress(FlotillaError):
                        pool.detach(volume_id)
                raise

    def _format_and_mount(self, system: System, device: str, staging: NodePath,
                          fs_type: str, flags: tuple[str, ...]) -> None:
        volume_id = self.volume_id
        existing = system.probe_fs(device)
        if existing is None:
            log.info("formatting %s (%s) as %s", volume_id, device, fs_type)
            system.mkfs(device, fs_type)
            crashpoint("node.stage.formatted")
        elif existing != fs_type:
            raise FailedPrecondition(f"volume {volume_id} already holds a {existing} "
                                     f"filesystem; it cannot be staged as {fs_type}")
        else:
            system.fsck(device, fs_type)
            self._grow_offline(system, device, fs_type)
        options = [*self.pool.mount_options, *flags]
        if fs_type == "xfs" and "nouuid" not in options:
            options.append("nouuid")  # clones and snapshots share the XFS UUID
        with caller_flags(flags, f"mounting volume {volume_id}"):
            system.mount(device, staging, fs_type, options)
        crashpoint("node.stage.mounted")
        if existing == "xfs":
            try:  # a restore into a larger volume, or growth while unstaged
                system.grow_fs("xfs", device, staging.real)
            except CommandFailed as err:
                log.warning("xfs_growfs on %s failed: %s", staging.given, err)

    def _grow_offline(self, system: System, device: str, fs_type: str) -> None:
        """ext4 growth refused online (or never attempted) happens here, before mount."""
        if fs_type != "ext4":
            return
        fs_bytes = system.fs_block_count(fs_type, device)
        dev_bytes = system.device_size(device)
        if fs_bytes is not None and dev_bytes - fs_bytes > GROW_SLACK:
            log.info("growing ext4 of %s from %d to %d bytes before mounting",
                     self.volume_id, fs_bytes, dev_bytes)
            system.fsck(device, fs_type, force=True)
            system.grow_fs(fs_type, device, None)

    # ---- unstage --------------------------------------------------------------------

    def check_unstage(self, system: System, staging: NodePath | None) -> None:
        """Unstaging under a live publish would leave the filesystem mounted through the
        publish while its device is detached, and a later stage would mount the same
        filesystem a second time through a new device: refuse until unpublished. A raw
        block volume has no staging mount (nor, often, a staging directory): its publishes
        are binds of the device itself."""
        device = self.pool.device_of(self.volume_id)
        if device is None:
            return
        staged = None if staging is None else system.mount_at(staging)
        published = [m.mount_point for m in system.mounts()
                     if (staging is None or m.mount_point != staging.real)
                     and (system.is_mount_of(m, device)
                          or (staged is not None and m.major_minor == staged.major_minor))]
        if published:
            raise FailedPrecondition(f"volume {self.volume_id} is still published at "
                                     f"{', '.join(published)}; NodeUnpublishVolume first")

    def detach(self) -> None:
        self.pool.detach(self.volume_id)

    # ---- publish --------------------------------------------------------------------

    def publish(self, host: NodeHost, req: PublishRequest) -> None:
        system, vid = host.system, self.volume_id
        device = self.pool.device_of(vid)
        if device is None:
            raise FailedPrecondition(f"volume {vid} is not staged on this node; call "
                                     "NodeStageVolume first")
        if req.block:
            self._bind(host, device, req.target, req.readonly, (), is_file=True,
                       same=lambda m: system.is_mount_of(m, device))
            return
        with host.path(req.staging_path, "staging_target_path") as staging:
            staged = system.mount_at(staging)
            if staged is None:
                raise FailedPrecondition(f"volume {vid} is not staged at "
                                         f"{staging.given}; call NodeStageVolume first")
            if not system.is_mount_of(staged, device):
                raise FailedPrecondition(f"staging_target_path {staging.given} holds "
                                         f"{staged.source}, not volume {vid}")
            self._bind(host, staging, req.target, req.readonly, req.mount_flags,
                       is_file=False, same=lambda m: m.major_minor == staged.major_minor)

    @staticmethod
    def _bind(host: NodeHost, source: str | NodePath, target: NodePath, readonly: bool,
              flags: tuple[str, ...], is_file: bool,
              same: Callable[[MountInfo], bool]) -> None:
        current = host.system.mount_at(target)
        if current is not None:
            if same(current) and current.readonly == readonly:
                return
            raise AlreadyExists(f"target_path {target.given} is already a mount of "
                                f"{current.source} ({'ro' if current.readonly else 'rw'}), "
                                "incompatible with this request")
        with host.new_place(target, is_file):
            crashpoint("node.publish.target-created")
            with caller_flags(flags, f"publishing at {target.given}"):
                host.system.bind_mount(source, target, readonly=readonly, options=flags)

    def unmount(self, system: System, target: NodePath) -> None:
        system.umount(target)

    # ---- stats and expansion --------------------------------------------------------

    def stats(self, system: System, p: NodePath, m: MountInfo) -> VolumeStats:
        device = self.pool.device_of(self.volume_id)
        condition = self._condition(system, device, p, m)
        if m.fstype == "devtmpfs":  # a raw block volume: its device node bound on a file
            return VolumeStats(condition,
                               device_bytes=system.device_size(device) if device else 0)
        try:
            st = system.fstatvfs(p)
        except (OSError, FlotillaError) as err:
            return VolumeStats(Condition(True, f"filesystem unreadable: {err}"))
        return VolumeStats(condition, fs=st)

    def _condition(self, system: System, device: str | None, p: NodePath,
                   m: MountInfo) -> Condition:
        cond = self.pool.volume_condition(self.volume_id)
        if cond.abnormal:
            return cond
        if device is None:
            return Condition(True, "volume is not attached on this node")
        backing = system.loop_backing_file(device) or ""
        if backing.endswith("(deleted)"):
            return Condition(True, f"backing file of {device} was deleted")
        if m.fstype != "devtmpfs":
            broken = system.read_error(p)
            if broken is not None:
                return Condition(True, f"filesystem I/O error: {broken}")
        return Condition(False, "volume is healthy")

    def expand(self, host: NodeHost, p: NodePath, m: MountInfo) -> int:
        with host.hold(self.volume_id):
            size = self.pool.refresh_device(self.volume_id)
            device = self.pool.device_of(self.volume_id)
            if device is None or m.fstype == "devtmpfs":
                return size
            if m.fstype not in FS_TYPES:
                raise FailedPrecondition(f"cannot grow a {m.fstype} filesystem")
            try:
                host.system.grow_fs(m.fstype, device, p.real)
            except CommandFailed as err:
                if m.fstype != "ext4" or "Permission denied" not in err.stderr:
                    raise
                log.warning("online ext4 growth of %s refused (%s); it grows at the next "
                            "NodeStageVolume", self.volume_id, err.stderr[-200:])
            return size


class NetworkAccess(Access):
    """The node mounts the volume's export (:meth:`Pool.mount_source`) at each target;
    nothing is staged and nothing attached, and a raw block volume is refused."""

    def _refuse_block(self, block: bool) -> None:
        if block:
            raise InvalidArgument(f"pool {self.pool.name!r} ({self.pool.type}) serves "
                                  "filesystem volumes only, not raw block")

    def owns(self, system: System, m: MountInfo) -> bool:
        return is_network_fs(m.fstype) and \
            m.source.rstrip("/") == self.pool.mount_source(self.volume_id)

    def stage(self, host: NodeHost, req: StageRequest) -> None:
        self._refuse_block(req.block)  # mounted at publish

    def check_unstage(self, system: System, staging: NodePath | None) -> None:
        return None  # publishes are mounts of their own, not of the staging path

    def detach(self) -> None:
        return None  # nothing was attached

    def publish(self, host: NodeHost, req: PublishRequest) -> None:
        """Mount the volume's export directory at the target; a stale mount there
        (ESTALE, a server that stopped answering) is replaced."""
        self._refuse_block(req.block)
        system, target, volume_id = host.system, req.target, self.volume_id
        source = self.pool.mount_source(volume_id)
        current = system.mount_at(target)
        if current is not None and not system.path_alive(target):
            host.check_owner(volume_id, current, target)
            log.warning("%s: mount at %s is stale or hung; remounting", volume_id,
                        target.given)
            system.umount_network(target)
            current = None
        if current is not None:
            if current.source.rstrip("/") == source and current.readonly == req.readonly:
                return
            raise AlreadyExists(f"target_path {target.given} already has {current.source} "
                                f"({'ro' if current.readonly else 'rw'}) mounted")
        with host.new_place(target, is_file=False):
            crashpoint("node.publish.target-created")
            options = [*self.pool.mount_options, *req.mount_flags,
                       *(["ro"] if req.readonly else [])]
            with caller_flags(req.mount_flags, f"mounting volume {volume_id}"):
                system.mount(source, target, "nfs", options, timeout=self.pool.mount_timeout)

    def unmount(self, system: System, target: NodePath) -> None:
        system.umount_network(target)

    def stats(self, system: System, p: NodePath, m: MountInfo) -> VolumeStats:
        """Asked from a child with a timeout: a dead server makes an abnormal condition,
        never a hung call."""
        st = system.statfs(p)
        if st is None:
            return VolumeStats(Condition(
                True, f"{p.given} does not answer: stale handle or server down"))
        return VolumeStats(self.pool.volume_condition(self.volume_id), fs=st)

    def expand(self, host: NodeHost, p: NodePath, m: MountInfo) -> int:
        return self.pool.refresh_device(self.volume_id)  # the server's directory: no fs
