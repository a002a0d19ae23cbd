"""CSI Node service: stage (attach, format, mount), publish (bind), stats, expand.

Every operation looks at the current mount table first, so a repeated call is a no-op
and a conflicting one is refused with ALREADY_EXISTS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable

import grpc

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2, csi_pb2_grpc
from csi.errors import (
    AlreadyExists,
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi.faults import crashpoint
from csi.locks import KeyedTryLock
from csi.pools import PoolSet
from csi.pools.base import Pool
from csi.system import MountInfo, System
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


def _same_device(m: MountInfo, device: str) -> bool:
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

    # ---- stage ----------------------------------------------------------------------

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        check_id(request.volume_id, "volume_id")
        staging = check_path(request.staging_target_path, self.roots, "staging_target_path")
        caps = self._capability(request)
        pool = self._pool(request.volume_id)
        if pool.network:
            if caps.block:
                raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) serves filesystem "
                                      "volumes only, not raw block")
            return csi_pb2.NodeStageVolumeResponse()  # mounted at publish
        with self.locks.hold(request.volume_id):
            if caps.block:
                pool.attach(request.volume_id)
                return csi_pb2.NodeStageVolumeResponse()
            fs_type = self._fs_type(caps, dict(request.volume_context))
            current = self.system.mount_at(staging)
            device = pool.attach(request.volume_id)
            crashpoint("node.stage.attached")
            if current is not None:
                if not _same_device(current, device):
                    raise AlreadyExists(f"staging_target_path {staging} already has "
                                        f"{current.source} mounted")
                return csi_pb2.NodeStageVolumeResponse()
            self._format_and_mount(request.volume_id, device, staging, fs_type,
                                   (*pool.mount_options, *caps.mount_flags))
        return csi_pb2.NodeStageVolumeResponse()

    def _format_and_mount(self, volume_id: str, device: str, staging: str, fs_type: str,
                          flags: tuple[str, ...]) -> None:
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
        options = list(flags)
        if fs_type == "xfs" and "nouuid" not in options:
            options.append("nouuid")  # clones and snapshots share the XFS UUID
        os.makedirs(staging, exist_ok=True)
        self.system.mount(device, staging, fs_type, options)
        crashpoint("node.stage.mounted")
        if existing == "xfs":
            try:  # a restore into a larger volume, or growth while unstaged
                self.system.grow_fs("xfs", device, staging)
            except CommandFailed as err:
                log.warning("xfs_growfs on %s failed: %s", staging, err)

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
        staging = check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self.pools.owner(request.volume_id)
        with self.locks.hold(request.volume_id):
            if pool is not None and not pool.network:
                self._refuse_if_published(pool, request.volume_id, staging)
            while self.system.mount_at(staging) is not None:
                self.system.umount(staging)
            if pool is not None:
                pool.detach(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    def _refuse_if_published(self, pool: Pool, volume_id: str, staging: str) -> None:
        """Unstaging under a live publish would leave the filesystem mounted through the
        publish while its device is detached, and a later stage would mount the same
        filesystem a second time through a new device: refuse until unpublished."""
        device = pool.device_of(volume_id)
        if device is None:
            return
        staged = self.system.mount_at(staging)
        here = os.path.join(os.path.realpath(os.path.dirname(staging)),
                            os.path.basename(staging))
        mounts = self.system.mounts()
        published = [m.mount_point for m in mounts if m.mount_point != here
                     and (_same_device(m, device) or (staged is not None
                                                      and m.major_minor == staged.major_minor))]
        if published:
            raise FailedPrecondition(f"volume {volume_id} is still published at "
                                     f"{', '.join(published)}; NodeUnpublishVolume first")

    # ---- publish --------------------------------------------------------------------

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        target = check_path(request.target_path, self.roots, "target_path")
        caps = self._capability(request)
        staging = check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self._pool(request.volume_id)
        readonly = request.readonly or caps.read_only
        with self.locks.hold(request.volume_id):
            if pool.network:
                if caps.block:
                    raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) serves "
                                          "filesystem volumes only, not raw block")
                self._publish_network(pool, request.volume_id, target, readonly,
                                      caps.mount_flags)
                return csi_pb2.NodePublishVolumeResponse()
            if caps.block:
                device = pool.device_of(request.volume_id)
                if device is None:
                    raise FailedPrecondition(f"volume {request.volume_id} is not staged; "
                                             "call NodeStageVolume first")
                self._publish(device, target, readonly, (), is_file=True,
                              same=lambda m: _same_device(m, device))
                return csi_pb2.NodePublishVolumeResponse()
            staged = self.system.mount_at(staging)
            if staged is None:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged at "
                                         f"{staging}; call NodeStageVolume first")
            self._publish(staging, target, readonly, caps.mount_flags, is_file=False,
                          same=lambda m: m.major_minor == staged.major_minor)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, source: str, target: str, readonly: bool, flags: tuple[str, ...],
                 is_file: bool, same: Callable[[MountInfo], bool]) -> None:
        current = self.system.mount_at(target)
        if current is not None:
            if same(current) and current.readonly == readonly:
                return
            raise AlreadyExists(f"target_path {target} is already a mount of "
                                f"{current.source} ({'ro' if current.readonly else 'rw'}), "
                                "incompatible with this request")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if is_file:
            if os.path.isdir(target):
                raise AlreadyExists(f"target_path {target} is a directory; a block volume "
                                    "is published on a file")
            with open(target, "a"):
                pass
        else:
            if os.path.exists(target) and not os.path.isdir(target):
                raise AlreadyExists(f"target_path {target} is a file; a filesystem volume "
                                    "is published on a directory")
            os.makedirs(target, exist_ok=True)
        crashpoint("node.publish.target-created")
        self.system.bind_mount(source, target, readonly=readonly, options=flags)

    def _publish_network(self, pool: Pool, volume_id: str, target: str, readonly: bool,
                         flags: tuple[str, ...]) -> None:
        """Mount the volume's export directory at the target; a stale mount there (ESTALE,
        a server that stopped answering) is replaced."""
        source = pool.mount_source(volume_id)
        current = self.system.mount_at(target)
        if current is not None and not self.system.path_alive(target):
            log.warning("%s: mount at %s is stale or hung; remounting", volume_id, target)
            self.system.umount_network(target)
            current = None
        if current is not None:
            if current.source.rstrip("/") == source and current.readonly == readonly:
                return
            raise AlreadyExists(f"target_path {target} already has {current.source} "
                                f"({'ro' if current.readonly else 'rw'}) mounted")
        os.makedirs(target, exist_ok=True)
        crashpoint("node.publish.target-created")
        options = [*pool.mount_options, *flags, *(["ro"] if readonly else [])]
        self.system.mount(source, target, "nfs", options, timeout=pool.mount_timeout)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        target = check_path(request.target_path, self.roots, "target_path")
        with self.locks.hold(request.volume_id):
            while (current := self.system.mount_at(target)) is not None:
                if current.fstype.startswith("nfs"):
                    self.system.umount_network(target)
                else:
                    self.system.umount(target)
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(target) and not os.path.islink(target):
                    os.rmdir(target)
                else:
                    os.unlink(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ---- stats and expansion --------------------------------------------------------

    def _published_path(self, volume_id: str, path: str) -> tuple[Pool, str]:
        """The pool and a path where this volume is staged or published (else NotFound)."""
        check_id(volume_id, "volume_id")
        if not path:
            raise InvalidArgument("volume_path is required")
        pool = self._pool(volume_id)
        missing = NotFound(f"volume {volume_id} is not available at {path!r}")
        if not os.path.isabs(path) or ".." in path.split("/"):
            raise missing
        # a mount point counts as there without touching it: a stale or hung NFS mount
        # must come back as an abnormal condition, not as NOT_FOUND or a hang
        if self.system.mount_at(path) is None and not os.path.exists(path):
            raise missing
        check_path(path, self.roots, "volume_path")
        return pool, os.path.normpath(path)

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        pool, path = self._published_path(request.volume_id, request.volume_path)
        Unit = csi_pb2.VolumeUsage.Unit
        if pool.network:
            return self._network_stats(pool, request.volume_id, path)
        device = pool.device_of(request.volume_id)
        condition = self._condition(pool, request.volume_id, device, path)
        mode = os.stat(path).st_mode
        if stat.S_ISBLK(mode) or (stat.S_ISREG(mode) and device is not None):
            total = self.system.device_size(device) if device else 0
            return csi_pb2.NodeGetVolumeStatsResponse(
                usage=[csi_pb2.VolumeUsage(unit=Unit.BYTES, total=total)],
                volume_condition=condition)
        try:
            st = os.statvfs(path)
        except OSError as err:
            return csi_pb2.NodeGetVolumeStatsResponse(
                volume_condition=csi_pb2.VolumeCondition(
                    abnormal=True, message=f"filesystem unreadable: {err.strerror}"))
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=_fs_usage(st),
            volume_condition=condition,
        )

    def _network_stats(self, pool: Pool, volume_id: str,
                       path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Stats of a network mount, asked from a child with a timeout: a dead server
        makes an abnormal condition, never a hung call."""
        st = self.system.statfs(path)
        if st is None:
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=csi_pb2.VolumeCondition(
                abnormal=True, message=f"{path} does not answer: stale handle or server down"))
        cond = pool.volume_condition(volume_id)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=_fs_usage(st),
            volume_condition=csi_pb2.VolumeCondition(abnormal=cond.abnormal,
                                                     message=cond.message))

    def _condition(self, pool: Pool, volume_id: str, device: str | None,
                   path: str) -> csi_pb2.VolumeCondition:
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
        if os.path.isdir(path):
            try:
                os.listdir(path)
            except OSError as err:
                if err.errno in (errno.EIO, errno.ESTALE, errno.ENOTCONN):
                    return csi_pb2.VolumeCondition(
                        abnormal=True, message=f"filesystem I/O error: {err.strerror}")
                raise
        return csi_pb2.VolumeCondition(abnormal=False, message="volume is healthy")

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        pool, path = self._published_path(request.volume_id, request.volume_path)
        if pool.network:
            return csi_pb2.NodeExpandVolumeResponse(
                capacity_bytes=pool.refresh_device(request.volume_id))
        with self.locks.hold(request.volume_id):
            size = pool.refresh_device(request.volume_id)
            device = pool.device_of(request.volume_id)
            mount = self.system.mount_at(path)
            if device is None or mount is None or mount.fstype == "devtmpfs":
                return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)
            if mount.fstype not in FS_TYPES:
                raise FailedPrecondition(f"cannot grow a {mount.fstype} filesystem")
            try:
                self.system.grow_fs(mount.fstype, device, path)
            except CommandFailed as err:
                if mount.fstype != "ext4" or "Permission denied" not in err.stderr:
                    raise
                log.warning("online ext4 growth of %s refused (%s); it grows at the next "
                            "NodeStageVolume", request.volume_id, err.stderr[-200:])
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

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
