"""CSI Node service: stage (attach, format, mount), publish (bind), stats, expand.

Every operation looks at the current mount table first, so a repeated call is a no-op
and a conflicting one is refused with ALREADY_EXISTS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator

import grpc

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2, csi_pb2_grpc
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
from csi.faults import crashpoint
from csi.locks import KeyedTryLock
from csi.pools import PoolDown, PoolSet
from csi.pools.base import Pool
from csi.system import MountInfo, NodePath, System, is_network_fs
from csi.validation import (
    DEFAULT_FS_TYPE,
    FS_TYPES,
    CapabilitySet,
    check_id,
    check_path,
    read_capabilities,
)

log = logging.getLogger(__name__)

NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
CAPABILITIES = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.EXPAND_VOLUME,
    NodeCap.VOLUME_CONDITION,
)
#: a filesystem smaller than its device by more than this is grown at stage
GROW_SLACK = 1 << 20


def _fs_usage(st: os.statvfs_result) -> list[csi_pb2.VolumeUsage]:
    """Bytes and inodes of a filesystem, as NodeGetVolumeStats reports them."""
    Unit = csi_pb2.VolumeUsage.Unit
    return [
        csi_pb2.VolumeUsage(unit=Unit.BYTES, total=st.f_blocks * st.f_frsize,
                            available=st.f_bavail * st.f_frsize,
                            used=(st.f_blocks - st.f_bfree) * st.f_frsize),
        csi_pb2.VolumeUsage(unit=Unit.INODES, total=st.f_files, available=st.f_favail,
                            used=st.f_files - st.f_ffree),
    ]


class NodeService(csi_pb2_grpc.NodeServicer):
    """Every path a request names is resolved beneath an allowed root without following a
    link (:meth:`System.node_path`), and every mount found at a path must belong to the
    request's volume before the node acts on it."""

    def __init__(self, pools: PoolSet, system: System, node_id: str, locks: KeyedTryLock,
                 allowed_roots: list[str], max_volumes: int) -> None:
        self.pools = pools
        self.system = system
        self.node_id = node_id
        self.locks = locks
        self.roots = allowed_roots
        self.max_volumes = max_volumes

    # ---- helpers --------------------------------------------------------------------

    def _pool(self, volume_id: str) -> Pool:
        check_id(volume_id, "volume_id")
        pool = self.pools.owner(volume_id)
        if pool is None or pool.get_volume(volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}")
        return pool

    def _path(self, path: str, what: str, create_parents: bool = False
              ) -> contextlib.AbstractContextManager[NodePath]:
        return self.system.node_path(path, self.roots, what, create_parents)

    @contextlib.contextmanager
    def _path_if_there(self, path: str, what: str) -> Iterator[NodePath | None]:
        """Like :meth:`_path`, but None when a directory on the way is gone (so nothing
        can be mounted there): unpublish and unstage are then done already."""
        with contextlib.ExitStack() as stack:
            try:
                found: NodePath | None = stack.enter_context(self._path(path, what))
            except NotFound:
                found = None
            yield found

    def _capability(self, request: csi_pb2.NodeStageVolumeRequest
                    | csi_pb2.NodePublishVolumeRequest) -> CapabilitySet:
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        return read_capabilities([request.volume_capability], "volume_capability")

    def _fs_type(self, caps: CapabilitySet, context: dict[str, str]) -> str:
        fs = caps.fs_type or context.get("fsType") or DEFAULT_FS_TYPE
        if fs not in FS_TYPES:
            raise InvalidArgument(f"fsType {fs!r} is not supported; use one of "
                                  f"{', '.join(FS_TYPES)}")
        return fs

    def _owns(self, pool: Pool, volume_id: str, m: MountInfo) -> bool:
        """Is the mount ``m`` this volume (its filesystem, a bind of it, its device node,
        or its network export)?"""
        if pool.network:
            return is_network_fs(m.fstype) and \
                m.source.rstrip("/") == pool.mount_source(volume_id)
        device = pool.device_of(volume_id)
        return device is not None and self.system.is_mount_of(m, device)

    def _check_owner(self, volume_id: str, m: MountInfo, at: NodePath) -> None:
        """Refuse to act on a mount that is not this volume's."""
        pool = self.pools.owner(volume_id)
        if pool is None or pool.get_volume(volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}; "
                           f"{m.source} ({m.fstype}) mounted at {at.what} {at.given!r} is "
                           "left alone")
        if not self._owns(pool, volume_id, m):
            raise FailedPrecondition(f"{at.what} {at.given!r} holds {m.source} ({m.fstype}), "
                                     f"which is not volume {volume_id}; nothing was "
                                     "unmounted")

    def _volume_mounted_at(self, m: MountInfo) -> str | None:
        """The id of the local volume whose filesystem ``m`` is, if any."""
        for pool in self.pools:
            if pool.network:
                continue  # network mounts are never entered (System.node_path)
            for vol in pool.list_volumes():
                if self._owns(pool, vol.id, m):
                    return vol.id
        return None

    def _check_place(self, p: NodePath) -> None:
        """A new mount at ``p`` must neither hide mounts below it nor sit inside the
        filesystem of a volume (which would break that volume's freeze, growth and
        unstage)."""
        below = self.system.mounts_below(p)
        if below:
            raise FailedPrecondition(f"{p.what} {p.given!r} has {below[0].mount_point} "
                                     "mounted below it; unmount that first")
        self._refuse_inside_volume(p)

    def _refuse_inside_volume(self, p: NodePath) -> None:
        for m in self.system.mounts_above(p):
            owner = self._volume_mounted_at(m)
            if owner is not None:
                raise InvalidArgument(f"{p.what} {p.given!r} is inside the filesystem of "
                                      f"volume {owner} (mounted at {m.mount_point}); stage "
                                      "and publish paths must be outside every volume")

    @contextlib.contextmanager
    def _new_place(self, p: NodePath, is_file: bool) -> Iterator[None]:
        """Create the mount point (a directory, or a file for a block volume) unless it is
        there; remove it again if the body fails, so a refused call changes nothing."""
        self._check_place(p)
        created = self.system.lstat(p) is None
        if is_file:
            self.system.make_file(p)
        else:
            self.system.make_dir(p)
        try:
            yield
        except BaseException:
            if created and self.system.mount_at(p) is None:
                with contextlib.suppress(FlotillaError):
                    self.system.remove(p)
            raise

    @staticmethod
    @contextlib.contextmanager
    def _caller_flags(flags: tuple[str, ...], what: str) -> Iterator[None]:
        """A mount that fails while the request named mount flags failed because of them
        as far as the caller can tell: INVALID_ARGUMENT, with mount's own words."""
        try:
            yield
        except CommandFailed as err:
            if not flags or isinstance(err, CommandTimeout):
                raise
            raise InvalidArgument(f"{what} with mount flags {list(flags)} failed; check the "
                                  f"StorageClass mountOptions: {err.stderr[-300:]}") from None

    # ---- stage ----------------------------------------------------------------------

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        caps = self._capability(request)
        pool = self._pool(request.volume_id)
        if pool.network:
            if caps.block:
                raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) serves filesystem "
                                      "volumes only, not raw block")
            return csi_pb2.NodeStageVolumeResponse()  # mounted at publish
        with self.locks.hold(request.volume_id):
            if caps.block:
                # the staging path is not used, but it is checked as unstage will check it
                with self._path_if_there(request.staging_target_path, "staging_target_path"):
                    pool.attach(request.volume_id)
                return csi_pb2.NodeStageVolumeResponse()
            fs_type = self._fs_type(caps, dict(request.volume_context))
            with self._path(request.staging_target_path, "staging_target_path",
                            create_parents=True) as staging:
                self._stage(pool, request.volume_id, staging, fs_type, caps.mount_flags)
        return csi_pb2.NodeStageVolumeResponse()

    def _stage(self, pool: Pool, volume_id: str, staging: NodePath, fs_type: str,
               flags: tuple[str, ...]) -> None:
        current = self.system.mount_at(staging)
        if current is not None:
            device = pool.attach(volume_id)
            crashpoint("node.stage.attached")
            if not self.system.is_mount_of(current, device):
                raise AlreadyExists(f"staging_target_path {staging.given} already has "
                                    f"{current.source} mounted")
            return
        was_attached = pool.device_of(volume_id) is not None
        with self._new_place(staging, is_file=False):
            device = pool.attach(volume_id)
            crashpoint("node.stage.attached")
            try:
                self._format_and_mount(volume_id, device, staging, fs_type,
                                       pool.mount_options, flags)
            except BaseException:
                if not was_attached and self.system.mount_at(staging) is None:
                    with contextlib.suppress(FlotillaError):
                        pool.detach(volume_id)
                raise

    def _format_and_mount(self, volume_id: str, device: str, staging: NodePath, fs_type: str,
                          pool_flags: tuple[str, ...], flags: tuple[str, ...]) -> None:
        existing = self.system.probe_fs(device)
        if existing is None:
            log.info("formatting %s (%s) as %s", volume_id, device, fs_type)
            self.system.mkfs(device, fs_type)
            crashpoint("node.stage.formatted")
        elif existing != fs_type:
            raise FailedPrecondition(f"volume {volume_id} already holds a {existing} "
                                     f"filesystem; it cannot be staged as {fs_type}")
        else:
            self.system.fsck(device, fs_type)
            self._grow_offline(volume_id, device, fs_type)
        options = [*pool_flags, *flags]
        if fs_type == "xfs" and "nouuid" not in options:
            options.append("nouuid")  # clones and snapshots share the XFS UUID
        with self._caller_flags(flags, f"mounting volume {volume_id}"):
            self.system.mount(device, staging, fs_type, options)
        crashpoint("node.stage.mounted")
        if existing == "xfs":
            try:  # a restore into a larger volume, or growth while unstaged
                self.system.grow_fs("xfs", device, staging.real)
            except CommandFailed as err:
                log.warning("xfs_growfs on %s failed: %s", staging.given, err)

    def _grow_offline(self, volume_id: str, device: str, fs_type: str) -> None:
        """ext4 growth refused online (or never attempted) happens here, before mount."""
        if fs_type != "ext4":
            return
        fs_bytes = self.system.fs_block_count(fs_type, device)
        dev_bytes = self.system.device_size(device)
        if fs_bytes is not None and dev_bytes - fs_bytes > GROW_SLACK:
            log.info("growing ext4 of %s from %d to %d bytes before mounting", volume_id,
                     fs_bytes, dev_bytes)
            self.system.fsck(device, fs_type, force=True)
            self.system.grow_fs(fs_type, device, None)

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self.pools.owner(request.volume_id)
        with self.locks.hold(request.volume_id), \
                self._path_if_there(request.staging_target_path,
                                    "staging_target_path") as staging:
            if staging is not None:
                current = self.system.mount_at(staging)
                if current is not None:
                    self._check_owner(request.volume_id, current, staging)
                if pool is not None and not pool.network:
                    self._refuse_if_published(pool, request.volume_id, staging)
                while (current := self.system.mount_at(staging)) is not None:
                    self._check_owner(request.volume_id, current, staging)
                    self.system.umount(staging)
            if pool is not None:
                pool.detach(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    def _refuse_if_published(self, pool: Pool, volume_id: str, staging: NodePath) -> None:
        """Unstaging under a live publish would leave the filesystem mounted through the
        publish while its device is detached, and a later stage would mount the same
        filesystem a second time through a new device: refuse until unpublished."""
        device = pool.device_of(volume_id)
        if device is None:
            return
        staged = self.system.mount_at(staging)
        published = [m.mount_point for m in self.system.mounts()
                     if m.mount_point != staging.real
                     and (self.system.is_mount_of(m, device)
                          or (staged is not None and m.major_minor == staged.major_minor))]
        if published:
            raise FailedPrecondition(f"volume {volume_id} is still published at "
                                     f"{', '.join(published)}; NodeUnpublishVolume first")

    # ---- publish --------------------------------------------------------------------

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.target_path, self.roots, "target_path")
        caps = self._capability(request)
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self._pool(request.volume_id)
        readonly = request.readonly or caps.read_only
        vid = request.volume_id
        with self.locks.hold(vid), \
                self._path(request.target_path, "target_path", create_parents=True) as target:
            if pool.network:
                if caps.block:
                    raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) serves "
                                          "filesystem volumes only, not raw block")
                self._publish_network(pool, vid, target, readonly, caps.mount_flags)
                return csi_pb2.NodePublishVolumeResponse()
            device = pool.device_of(vid)
            if device is None:
                raise FailedPrecondition(f"volume {vid} is not staged on this node; call "
                                         "NodeStageVolume first")
            if caps.block:
                self._publish(device, target, readonly, (), is_file=True,
                              same=lambda m: self.system.is_mount_of(m, device))
                return csi_pb2.NodePublishVolumeResponse()
            with self._path(request.staging_target_path, "staging_target_path") as staging:
                staged = self.system.mount_at(staging)
                if staged is None:
                    raise FailedPrecondition(f"volume {vid} is not staged at "
                                             f"{staging.given}; call NodeStageVolume first")
                if not self.system.is_mount_of(staged, device):
                    raise FailedPrecondition(f"staging_target_path {staging.given} holds "
                                             f"{staged.source}, not volume {vid}")
                self._publish(staging, target, readonly, caps.mount_flags, is_file=False,
                              same=lambda m: m.major_minor == staged.major_minor)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, source: str | NodePath, target: NodePath, readonly: bool,
                 flags: tuple[str, ...], is_file: bool,
                 same: Callable[[MountInfo], bool]) -> None:
        current = self.system.mount_at(target)
        if current is not None:
            if same(current) and current.readonly == readonly:
                return
            raise AlreadyExists(f"target_path {target.given} is already a mount of "
                                f"{current.source} ({'ro' if current.readonly else 'rw'}), "
                                "incompatible with this request")
        with self._new_place(target, is_file):
            crashpoint("node.publish.target-created")
            with self._caller_flags(flags, f"publishing at {target.given}"):
                self.system.bind_mount(source, target, readonly=readonly, options=flags)

    def _publish_network(self, pool: Pool, volume_id: str, target: NodePath, readonly: bool,
                         flags: tuple[str, ...]) -> None:
        """Mount the volume's export directory at the target; a stale mount there (ESTALE,
        a server that stopped answering) is replaced."""
        source = pool.mount_source(volume_id)
        current = self.system.mount_at(target)
        if current is not None and not self.system.path_alive(target):
            self._check_owner(volume_id, current, target)
            log.warning("%s: mount at %s is stale or hung; remounting", volume_id,
                        target.given)
            self.system.umount_network(target)
            current = None
        if current is not None:
            if current.source.rstrip("/") == source and current.readonly == readonly:
                return
            raise AlreadyExists(f"target_path {target.given} already has {current.source} "
                                f"({'ro' if current.readonly else 'rw'}) mounted")
        with self._new_place(target, is_file=False):
            crashpoint("node.publish.target-created")
            options = [*pool.mount_options, *flags, *(["ro"] if readonly else [])]
            with self._caller_flags(flags, f"mounting volume {volume_id}"):
                self.system.mount(source, target, "nfs", options, timeout=pool.mount_timeout)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.target_path, self.roots, "target_path")
        with self.locks.hold(request.volume_id), \
                self._path_if_there(request.target_path, "target_path") as target:
            if target is None:
                return csi_pb2.NodeUnpublishVolumeResponse()
            if self.system.mount_at(target) is None:
                self._refuse_inside_volume(target)  # never remove a volume's own files
            while (current := self.system.mount_at(target)) is not None:
                self._check_owner(request.volume_id, current, target)
                if is_network_fs(current.fstype):
                    self.system.umount_network(target)
                else:
                    self.system.umount(target)
            self.system.remove(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ---- stats and expansion --------------------------------------------------------

    @contextlib.contextmanager
    def _published_path(self, volume_id: str, path: str
                        ) -> Iterator[tuple[Pool, NodePath, MountInfo]]:
        """The pool, the resolved path and the mount of this volume at ``path`` (a staging
        or publish path); NotFound when the volume is not mounted there."""
        check_id(volume_id, "volume_id")
        if not path:
            raise InvalidArgument("volume_path is required")
        pool = self._pool(volume_id)
        missing = NotFound(f"volume {volume_id} is not available at {path!r}")
        if not os.path.isabs(path) or ".." in path.split("/"):
            raise missing
        check_path(path, self.roots, "volume_path")
        # a mount point counts as there without touching it: a stale or hung NFS mount
        # must come back as an abnormal condition, not as NOT_FOUND or a hang
        with self._path(path, "volume_path") as p:
            mount = self.system.mount_at(p)
            if mount is None or not self._owns(pool, volume_id, mount):
                raise missing
            yield pool, p, mount

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        try:
            with self._published_path(request.volume_id, request.volume_path) as (pool, p, m):
                if pool.network:
                    return self._network_stats(pool, request.volume_id, p)
                return self._local_stats(pool, request.volume_id, p, m)
        except PoolDown as down:
            # the volume's pool failed to start: its condition says why (the kubelet shows
            # it on the pod), rather than an error the kubelet only logs
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=csi_pb2.VolumeCondition(
                abnormal=True, message=str(down)))

    def _local_stats(self, pool: Pool, volume_id: str, p: NodePath,
                     m: MountInfo) -> csi_pb2.NodeGetVolumeStatsResponse:
        Unit = csi_pb2.VolumeUsage.Unit
        device = pool.device_of(volume_id)
        condition = self._condition(pool, volume_id, device, p, m)
        if m.fstype == "devtmpfs":  # a raw block volume: its device node bound on a file
            total = self.system.device_size(device) if device else 0
            return csi_pb2.NodeGetVolumeStatsResponse(
                usage=[csi_pb2.VolumeUsage(unit=Unit.BYTES, total=total)],
                volume_condition=condition)
        try:
            st = self.system.fstatvfs(p)
        except (OSError, FlotillaError) as err:
            return csi_pb2.NodeGetVolumeStatsResponse(
                volume_condition=csi_pb2.VolumeCondition(
                    abnormal=True, message=f"filesystem unreadable: {err}"))
        return csi_pb2.NodeGetVolumeStatsResponse(usage=_fs_usage(st),
                                                  volume_condition=condition)

    def _network_stats(self, pool: Pool, volume_id: str,
                       p: NodePath) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Stats of a network mount, asked from a child with a timeout: a dead server
        makes an abnormal condition, never a hung call."""
        st = self.system.statfs(p)
        if st is None:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=csi_pb2.VolumeCondition(
                abnormal=True,
                message=f"{p.given} does not answer: stale handle or server down"))
        cond = pool.volume_condition(volume_id)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=_fs_usage(st),
            volume_condition=csi_pb2.VolumeCondition(abnormal=cond.abnormal,
                                                     message=cond.message))

    def _condition(self, pool: Pool, volume_id: str, device: str | None,
                   p: NodePath, m: MountInfo) -> csi_pb2.VolumeCondition:
        cond = pool.volume_condition(volume_id)
        if cond.abnormal:
            return csi_pb2.VolumeCondition(abnormal=True, message=cond.message)
        if device is None:
            return csi_pb2.VolumeCondition(abnormal=True,
                                           message="volume is not attached on this node")
        backing = self.system.loop_backing_file(device) or ""
        if backing.endswith("(deleted)"):
            return csi_pb2.VolumeCondition(
                abnormal=True, message=f"backing file of {device} was deleted")
        if m.fstype != "devtmpfs":
            try:
                self.system.list_dir(p)
            except OSError as err:
                if err.errno in (errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EUCLEAN):
                    return csi_pb2.VolumeCondition(
                        abnormal=True, message=f"filesystem I/O error: {err.strerror}")
                raise path_error(err, p.what, p.given) from None
        return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        with self._published_path(request.volume_id, request.volume_path) as (pool, p, mount):
            if pool.network:
                return csi_pb2.NodeExpandVolumeResponse(
                    capacity_bytes=pool.refresh_device(request.volume_id))
            with self.locks.hold(request.volume_id):
                return csi_pb2.NodeExpandVolumeResponse(
                    capacity_bytes=self._expand(pool, request.volume_id, p, mount))

    def _expand(self, pool: Pool, volume_id: str, p: NodePath, mount: MountInfo) -> int:
        size = pool.refresh_device(volume_id)
        device = pool.device_of(volume_id)
        if device is None or mount.fstype == "devtmpfs":
            return size
        if mount.fstype not in FS_TYPES:
            raise FailedPrecondition(f"cannot grow a {mount.fstype} filesystem")
        try:
            self.system.grow_fs(mount.fstype, device, p.real)
        except CommandFailed as err:
            if mount.fstype != "ext4" or "Permission denied" not in err.stderr:
                raise
            log.warning("online ext4 growth of %s refused (%s); it grows at the next "
                        "NodeStageVolume", volume_id, err.stderr[-200:])
        return size

    # ---- info -----------------------------------------------------------------------

    def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=c))
            for c in CAPABILITIES
        ])

    def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                    context: grpc.ServicerContext) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.node_id}),
        )
