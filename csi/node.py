"""CSI Node service: stage, publish, stats, expand; how a volume is reached (a block
device attached, formatted, mounted and bound; or an export mounted over the network) is
the :class:`~csi.pools.access.Access` its pool returns.

Every operation looks at the current mount table first, so a repeated call is a no-op
and a conflicting one is refused with ALREADY_EXISTS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2, csi_pb2_grpc
from csi.errors import FailedPrecondition, FlotillaError, InvalidArgument, NotFound
from csi.locks import KeyedTryLock
from csi.pools import PoolDown, PoolSet
from csi.pools.access import Access, PublishRequest, StageRequest, VolumeStats
from csi.pools.base import Pool
from csi.system import MountInfo, NodePath, System
from csi.validation import (
    DEFAULT_FS_TYPE,
    FS_TYPES,
    CapabilitySet,
    check_id,
    check_path,
    read_capabilities,
)

NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
CAPABILITIES = (
    NodeCap.STAGE_UNSTAGE_VOLUME,
    NodeCap.GET_VOLUME_STATS,
    NodeCap.EXPAND_VOLUME,
    NodeCap.VOLUME_CONDITION,
)


def _stats_response(stats: VolumeStats) -> csi_pb2.NodeGetVolumeStatsResponse:
    """NodeGetVolumeStats's answer: a filesystem's bytes and inodes, or a raw block
    device's size, with the volume's condition."""
    Unit = csi_pb2.VolumeUsage.Unit
    usage = []
    if stats.device_bytes is not None:
        usage.append(csi_pb2.VolumeUsage(unit=Unit.BYTES, total=stats.device_bytes))
    if stats.fs is not None:
        st = stats.fs
        usage += [
            csi_pb2.VolumeUsage(unit=Unit.BYTES, total=st.f_blocks * st.f_frsize,
                                available=st.f_bavail * st.f_frsize,
                                used=(st.f_blocks - st.f_bfree) * st.f_frsize),
            csi_pb2.VolumeUsage(unit=Unit.INODES, total=st.f_files, available=st.f_favail,
                                used=st.f_files - st.f_ffree),
        ]
    return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=csi_pb2.VolumeCondition(
        abnormal=stats.condition.abnormal, message=stats.condition.message))


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

    # ---- what the volumes' accesses borrow (csi.pools.access.NodeHost) -------------

    def hold(self, volume_id: str) -> contextlib.AbstractContextManager[None]:
        return self.locks.hold(volume_id)

    def path(self, path: str, what: str, create_parents: bool = False
             ) -> contextlib.AbstractContextManager[NodePath]:
        return self.system.node_path(path, self.roots, what, create_parents)

    @contextlib.contextmanager
    def path_if_there(self, path: str, what: str) -> Iterator[NodePath | None]:
        """Like :meth:`path`, but None when a directory on the way is gone (so nothing
        can be mounted there): unpublish and unstage are then done already."""
        with contextlib.ExitStack() as stack:
            try:
                found: NodePath | None = stack.enter_context(self.path(path, what))
            except NotFound:
                found = None
            yield found

    @contextlib.contextmanager
    def new_place(self, p: NodePath, is_file: bool) -> Iterator[None]:
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

    def check_owner(self, volume_id: str, m: MountInfo, at: NodePath) -> None:
        self._owner(volume_id, m, at)

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

    @staticmethod
    def _fs_type(caps: CapabilitySet, context: dict[str, str]) -> str:
        fs = caps.fs_type or context.get("fsType") or DEFAULT_FS_TYPE
        if fs not in FS_TYPES:
            raise InvalidArgument(f"fsType {fs!r} is not supported; use one of "
                                  f"{', '.join(FS_TYPES)}")
        return fs

    def _owner(self, volume_id: str, m: MountInfo, at: NodePath) -> Access:
        """The access of the volume whose mount ``m`` at ``at`` is; refuse to act on a
        mount that is not this volume's."""
        pool = self.pools.owner(volume_id)
        if pool is None or pool.get_volume(volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist on node {self.node_id}; "
                           f"{m.source} ({m.fstype}) mounted at {at.what} {at.given!r} is "
                           "left alone")
        access = pool.node_access(volume_id)
        if not access.owns(self.system, m):
            raise FailedPrecondition(f"{at.what} {at.given!r} holds {m.source} ({m.fstype}), "
                                     f"which is not volume {volume_id}; nothing was "
                                     "unmounted")
        return access

    def _volume_mounted_at(self, m: MountInfo) -> str | None:
        """The id of the local volume whose filesystem ``m`` is, if any. (Network mounts
        are never entered by a node path (System.node_path): they own nothing here.)"""
        for pool in self.pools:
            for vol in pool.list_volumes():
                if pool.node_access(vol.id).owns(self.system, m):
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

    # ---- stage ----------------------------------------------------------------------

    def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                        context: grpc.ServicerContext) -> csi_pb2.NodeStageVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        caps = self._capability(request)
        pool = self._pool(request.volume_id)
        volume_context = dict(request.volume_context)
        pool.node_access(request.volume_id).stage(self, StageRequest(
            staging_path=request.staging_target_path, block=caps.block,
            mount_flags=caps.mount_flags,
            fs_type=lambda: self._fs_type(caps, volume_context)))
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodeUnstageVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self.pools.owner(request.volume_id)
        access = pool.node_access(request.volume_id) if pool is not None else None
        with self.hold(request.volume_id), \
                self.path_if_there(request.staging_target_path,
                                   "staging_target_path") as staging:
            if staging is not None:
                current = self.system.mount_at(staging)
                if current is not None:
                    self._owner(request.volume_id, current, staging)
            if access is not None:
                access.check_unstage(self.system, staging)
            if staging is not None:
                while (current := self.system.mount_at(staging)) is not None:
                    self._owner(request.volume_id, current, staging)
                    self.system.umount(staging)
            if access is not None:
                access.detach()
        return csi_pb2.NodeUnstageVolumeResponse()

    # ---- publish --------------------------------------------------------------------

    def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                          context: grpc.ServicerContext) -> csi_pb2.NodePublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.target_path, self.roots, "target_path")
        caps = self._capability(request)
        check_path(request.staging_target_path, self.roots, "staging_target_path")
        pool = self._pool(request.volume_id)
        with self.hold(request.volume_id), \
                self.path(request.target_path, "target_path", create_parents=True) as target:
            pool.node_access(request.volume_id).publish(self, PublishRequest(
                target=target, staging_path=request.staging_target_path, block=caps.block,
                readonly=request.readonly or caps.read_only, mount_flags=caps.mount_flags))
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        check_id(request.volume_id, "volume_id")
        check_path(request.target_path, self.roots, "target_path")
        with self.hold(request.volume_id), \
                self.path_if_there(request.target_path, "target_path") as target:
            if target is None:
                return csi_pb2.NodeUnpublishVolumeResponse()
            if self.system.mount_at(target) is None:
                self._refuse_inside_volume(target)  # never remove a volume's own files
            while (current := self.system.mount_at(target)) is not None:
                self._owner(request.volume_id, current, target).unmount(self.system, target)
            self.system.remove(target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    # ---- stats and expansion --------------------------------------------------------

    @contextlib.contextmanager
    def _published_path(self, volume_id: str, path: str
                        ) -> Iterator[tuple[Access, NodePath, MountInfo]]:
        """The access, the resolved path and the mount of this volume at ``path`` (a
        staging or publish path); NotFound when the volume is not mounted there."""
        check_id(volume_id, "volume_id")
        if not path:
            raise InvalidArgument("volume_path is required")
        access = self._pool(volume_id).node_access(volume_id)
        missing = NotFound(f"volume {volume_id} is not available at {path!r}")
        if not path.startswith("/") or ".." in path.split("/"):
            raise missing
        check_path(path, self.roots, "volume_path")
        # a mount point counts as there without touching it: a stale or hung NFS mount
        # must come back as an abnormal condition, not as NOT_FOUND or a hang
        with self.path(path, "volume_path") as p:
            mount = self.system.mount_at(p)
            if mount is None or not access.owns(self.system, mount):
                raise missing
            yield access, p, mount

    def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                           context: grpc.ServicerContext
                           ) -> csi_pb2.NodeGetVolumeStatsResponse:
        try:
            with self._published_path(request.volume_id,
                                      request.volume_path) as (access, p, m):
                stats = access.stats(self.system, p, m)
        except PoolDown as down:
            # the volume's pool failed to start: its condition says why (the kubelet shows
            # it on the pod), rather than an error the kubelet only logs
            return csi_pb2.NodeGetVolumeStatsResponse(volume_condition=csi_pb2.VolumeCondition(
                abnormal=True, message=str(down)))
        return _stats_response(stats)

    def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                         context: grpc.ServicerContext) -> csi_pb2.NodeExpandVolumeResponse:
        with self._published_path(request.volume_id, request.volume_path) as (access, p, m):
            return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=access.expand(self, p, m))

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
