"""CSI Controller service: validate, take the try-lock, call the pool, build the reply."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2, csi_pb2_grpc
from csi.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unimplemented,
)
from csi.locks import KeyedTryLock
from csi.pools import PoolDown, PoolSet
from csi.pools.base import Placement, Pool, Snapshot, Source, Volume, VolumeRequest, parse_id
from csi.validation import (
    DEFAULT_FS_TYPE,
    K8S_PARAMETER_PREFIX,
    MIN_FS_BYTES,
    CapabilitySet,
    check_id,
    check_name,
    read_capabilities,
    resolve_size,
)

Cap = csi_pb2.ControllerServiceCapability.RPC.Type
CAPABILITIES = (
    Cap.CREATE_DELETE_VOLUME,
    Cap.CREATE_DELETE_SNAPSHOT,
    Cap.LIST_VOLUMES,
    Cap.LIST_SNAPSHOTS,
    Cap.GET_CAPACITY,
    Cap.CLONE_VOLUME,
    Cap.EXPAND_VOLUME,
    Cap.GET_VOLUME,
    Cap.VOLUME_CONDITION,
    # GET_SNAPSHOT (CSI 1.11+) is served by GetSnapshot but not advertised: csi-sanity
    # v5.4.0 fails on controller capabilities it does not know.
)
VOLUME_PARAMETERS = ("pool", "fsType")
#: backupTarget: back the snapshot up to this configured target (docs/backups.md)
SNAPSHOT_PARAMETERS: tuple[str, ...] = ("backupTarget",)

if TYPE_CHECKING:
    from csi.backup.manager import BackupManager

T = TypeVar("T")


def split_parameters(params: dict[str, str], known: Sequence[str]) -> dict[str, str]:
    """Keep the known parameters; accept and drop Kubernetes metadata; reject the rest."""
    kept = {}
    for key, value in params.items():
        if key in known:
            kept[key] = value
        elif not key.startswith(K8S_PARAMETER_PREFIX):
            allowed = ", ".join(known) if known else "none"
            raise InvalidArgument(f"unknown parameter {key!r}; accepted: {allowed}")
    return kept


def check_pool_serves(pool: Pool, caps: CapabilitySet) -> None:
    if caps.block and not pool.block:
        raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) serves filesystem volumes "
                              "only, not raw block")
    if caps.multi_node and not pool.multi_node:
        raise InvalidArgument(f"pool {pool.name!r} ({pool.type}) is node-local: it serves "
                              "single-node access modes only")


def paginate(items: list[T], key: Callable[[T], str], max_entries: int,
             token: str) -> tuple[list[T], str]:
    """Sort by id; the token is the last id returned, so deletions never break it."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    items = sorted(items, key=key)
    if token:
        if parse_id(token) is None:
            raise Aborted(f"starting_token {token!r} was not issued by this driver")
        items = [i for i in items if key(i) > token]
    if max_entries and len(items) > max_entries:
        return items[:max_entries], key(items[max_entries - 1])
    return items, ""


def placement_of(req: csi_pb2.CreateVolumeRequest) -> Placement:
    """The nodes (values of the topology key) a CreateVolume's requirements name."""
    ar = req.accessibility_requirements

    def nodes(topologies: Sequence[csi_pb2.Topology]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for t in topologies if (n := t.segments.get(TOPOLOGY_KEY))))

    return Placement(preferred=nodes(ar.preferred), requisite=nodes(ar.requisite))


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, pools: PoolSet, node_id: str, locks: KeyedTryLock,
                 backups: BackupManager | None = None) -> None:
        self.pools = pools
        self.node_id = node_id
        self.locks = locks
        #: for snapshots no pool here holds, known only through their backup (another
        #: node's, or a lost pool's): restored from it, deleted with it. The pools' own
        #: snapshots get their backups from the pools (wrapped at wiring time)
        self.backups = backups

    # ---- helpers --------------------------------------------------------------------

    def topology(self) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments={TOPOLOGY_KEY: self.node_id})

    def _volume_msg(self, vol: Volume) -> csi_pb2.Volume:
        shared = self.pools.pools.get(vol.pool) is not None and \
            not self.pools.pools[vol.pool].node_local
        msg = csi_pb2.Volume(
            volume_id=vol.id,
            capacity_bytes=vol.size,
            volume_context=self._context(vol),
            # a shared pool's volumes are reachable from every node: no constraint
            accessible_topology=[] if shared else [self.topology()],
        )
        if vol.source is not None:
            if vol.source.kind == "snapshot":
                msg.content_source.snapshot.snapshot_id = vol.source.id
            else:
                msg.content_source.volume.volume_id = vol.source.id
        return msg

    def _context(self, vol: Volume) -> dict[str, str]:
        ctx = {"pool": vol.pool}
        if vol.fs_type:
            ctx["fsType"] = vol.fs_type
        return ctx

    def _snapshot_msg(self, snap: Snapshot) -> csi_pb2.Snapshot:
        return csi_pb2.Snapshot(
            snapshot_id=snap.id,
            source_volume_id=snap.source_volume_id,
            size_bytes=snap.size,
            creation_time=timestamp(snap.created),
            ready_to_use=snap.ready,
        )

    def _volume(self, volume_id: str) -> tuple[Pool, Volume]:
        check_id(volume_id, "volume_id")
        pool = self.pools.owner(volume_id)
        vol = pool.get_volume(volume_id) if pool else None
        if pool is None or vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return pool, vol

    def _source(self, req: csi_pb2.CreateVolumeRequest) -> tuple[Source | None, int, Pool | None]:
        """(source, its size, its pool) of a CreateVolume request."""
        if not req.HasField("volume_content_source"):
            return None, 0, None
        cs = req.volume_content_source
        kind = cs.WhichOneof("type")
        if kind == "snapshot":
            sid = cs.snapshot.snapshot_id
            check_id(sid, "volume_content_source.snapshot.snapshot_id")
            pool = self.pools.owner(sid)
            snap = pool.get_snapshot(sid) if pool else None
            if pool is None or snap is None:
                # a snapshot of another node (or a lost one) known through its backup:
                # restored into whichever pool the request names
                backup = self.backups.source_of(sid) if self.backups else None
                if backup is None:
                    raise NotFound(f"source snapshot {sid} does not exist")
                return backup[0], backup[1], None
            return Source("snapshot", sid), snap.size, pool
        if kind == "volume":
            vid = cs.volume.volume_id
            check_id(vid, "volume_content_source.volume.volume_id")
            pool = self.pools.owner(vid)
            vol = pool.get_volume(vid) if pool else None
            if pool is None or vol is None:
                raise NotFound(f"source volume {vid} does not exist")
            return Source("volume", vid), vol.size, pool
        raise InvalidArgument("volume_content_source needs a snapshot or a volume")

    def _check_topology(self, req: csi_pb2.CreateVolumeRequest) -> None:
        if not req.HasField("accessibility_requirements"):
            return
        requisite = req.accessibility_requirements.requisite
        if requisite and not any(
            t.segments.get(TOPOLOGY_KEY) == self.node_id for t in requisite
        ):
            raise ResourceExhausted(
                f"no requisite topology includes {TOPOLOGY_KEY}={self.node_id}, the only "
                "node this controller provisions on"
            )

    # ---- volumes --------------------------------------------------------------------

    def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.CreateVolumeResponse:
        check_name(request.name, "name")
        caps = read_capabilities(request.volume_capabilities)
        params = split_parameters(dict(request.parameters), VOLUME_PARAMETERS)
        source, source_size, source_pool = self._source(request)
        pool = self.pools.named(params.get("pool")) if params.get("pool") or not source_pool \
            else source_pool
        if source_pool is not None and source_pool is not pool:
            raise InvalidArgument(f"the content source lives in pool {source_pool.name!r}; "
                                  f"it cannot seed a volume in pool {pool.name!r}")
        check_pool_serves(pool, caps)
        fs_type = ""
        if caps.mount and not pool.network:  # a network pool's volumes need no mkfs
            wanted = params.get("fsType", "")
            if wanted and wanted not in MIN_FS_BYTES:
                raise InvalidArgument(f"parameter fsType={wanted!r} is not supported; use "
                                      f"one of {', '.join(MIN_FS_BYTES)}")
            if wanted and caps.fs_type and wanted != caps.fs_type:
                raise InvalidArgument(f"parameter fsType={wanted} conflicts with the "
                                      f"capability's fs_type={caps.fs_type}")
            fs_type = caps.fs_type or wanted or DEFAULT_FS_TYPE
        if pool.node_local:
            self._check_topology(request)
        cr = request.capacity_range
        default = max(pool.default_size, source_size)
        fs_minimum = MIN_FS_BYTES.get(fs_type, 4096)
        size = resolve_size(cr.required_bytes, cr.limit_bytes, default,
                            max(fs_minimum, source_size), pool.granularity,
                            "the size of the source" if source_size > fs_minimum else
                            f"the smallest {fs_type or 'block'} volume")
        vreq = VolumeRequest(name=request.name, size=size, required=cr.required_bytes,
                             limit=cr.limit_bytes, fs_type=fs_type, block=caps.block,
                             source=source, parameters=params,
                             placement=placement_of(request))
        with self.locks.hold(f"volume-name:{request.name}", source.id if source else ""):
            for other in self.pools:
                found = other.find_volume(request.name)
                if found is not None and other is not pool:
                    raise AlreadyExists(f"volume {request.name!r} exists in pool "
                                        f"{other.name!r}, not {pool.name!r}")
            vol = pool.create_volume(vreq)
        return csi_pb2.CreateVolumeResponse(volume=self._volume_msg(vol))

    def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                     context: grpc.ServicerContext) -> csi_pb2.DeleteVolumeResponse:
        check_id(request.volume_id, "volume_id")
        pool = self.pools.owner(request.volume_id)
        if pool is not None:
            with self.locks.hold(request.volume_id):
                pool.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        pool, vol = self._volume(request.volume_id)
        caps = read_capabilities(request.volume_capabilities)
        split_parameters(dict(request.parameters), VOLUME_PARAMETERS)
        try:
            check_pool_serves(pool, caps)
            if caps.fs_type and vol.fs_type and caps.fs_type != vol.fs_type:
                raise InvalidArgument(f"volume has fsType {vol.fs_type}, not {caps.fs_type}")
        except InvalidArgument as err:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(err))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                    context: grpc.ServicerContext) -> csi_pb2.ListVolumesResponse:
        volumes = [(p, v) for p in self.pools for v in p.list_volumes()]
        page, token = paginate(volumes, lambda pv: pv[1].id, request.max_entries,
                               request.starting_token)
        entries = []
        for pool, vol in page:
            cond = pool.volume_condition(vol.id)
            entries.append(csi_pb2.ListVolumesResponse.Entry(
                volume=self._volume_msg(vol),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    volume_condition=csi_pb2.VolumeCondition(abnormal=cond.abnormal,
                                                             message=cond.message)),
            ))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=token)

    def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                            context: grpc.ServicerContext
                            ) -> csi_pb2.ControllerGetVolumeResponse:
        pool, vol = self._volume(request.volume_id)
        cond = pool.volume_condition(vol.id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_msg(vol),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                volume_condition=csi_pb2.VolumeCondition(abnormal=cond.abnormal,
                                                         message=cond.message)),
        )

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        params = split_parameters(dict(request.parameters), VOLUME_PARAMETERS)
        try:
            pool = self.pools.named(params.get("pool"))
        except PoolDown:  # nothing fits a pool that is not serving: not an error, so
            return csi_pb2.GetCapacityResponse(available_capacity=0)  # nothing lands there
        if request.volume_capabilities:
            try:
                check_pool_serves(pool, read_capabilities(request.volume_capabilities))
            except InvalidArgument:
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        if (request.HasField("accessible_topology") and pool.node_local
                and request.accessible_topology.segments.get(TOPOLOGY_KEY) != self.node_id):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        cap = pool.capacity()
        resp = csi_pb2.GetCapacityResponse(available_capacity=cap.available)
        resp.maximum_volume_size.value = cap.available
        resp.minimum_volume_size.value = pool.granularity
        return resp

    # ---- RPCs Flotilla does not serve (their capabilities are not advertised) ---------

    def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise Unimplemented("ControllerPublishVolume is not served: Flotilla volumes need no "
                            "attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)")

    def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise Unimplemented("ControllerUnpublishVolume is not served: Flotilla volumes need "
                            "no attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)")

    def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise Unimplemented("ControllerModifyVolume is not served: Flotilla has no mutable "
                            "volume parameters (MODIFY_VOLUME is not advertised)")

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(
                rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
            for c in CAPABILITIES
        ])

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        pool, vol = self._volume(request.volume_id)
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            check_pool_serves(pool, read_capabilities([request.volume_capability],
                                                      "volume_capability"))
        cr = request.capacity_range
        size = resolve_size(cr.required_bytes, cr.limit_bytes, vol.size, vol.size,
                            pool.granularity, "the volume's current size")
        with self.locks.hold(vol.id):
            grown = pool.expand_volume(vol.id, size)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=grown.size, node_expansion_required=pool.node_expansion)

    # ---- snapshots ------------------------------------------------------------------

    def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.CreateSnapshotResponse:
        check_name(request.name, "name")
        check_id(request.source_volume_id, "source_volume_id")
        params = split_parameters(dict(request.parameters), SNAPSHOT_PARAMETERS)
        with self.locks.hold(f"snapshot-name:{request.name}", request.source_volume_id):
            for pool in self.pools:
                found = pool.find_snapshot(request.name)
                if found is not None and found.source_volume_id != request.source_volume_id:
                    raise AlreadyExists(
                        f"snapshot {request.name!r} exists for volume "
                        f"{found.source_volume_id}, not {request.source_volume_id}")
            pool, _ = self._volume(request.source_volume_id)
            pool.check_snapshot_parameters(params)
            snap = pool.create_snapshot(request.name, request.source_volume_id, params)
        return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_msg(snap))

    def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                       context: grpc.ServicerContext) -> csi_pb2.DeleteSnapshotResponse:
        check_id(request.snapshot_id, "snapshot_id")
        pool = self.pools.owner(request.snapshot_id)
        if pool is not None:
            with self.locks.hold(request.snapshot_id):
                pool.delete_snapshot(request.snapshot_id)  # and its backup (backup/pool.py)
        elif self.backups is not None:  # a snapshot of a pool not configured here
            with self.locks.hold(request.snapshot_id):
                self.backups.forget(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                      context: grpc.ServicerContext) -> csi_pb2.ListSnapshotsResponse:
        for wanted in (request.snapshot_id, request.source_volume_id):
            if wanted:
                self.pools.owner(wanted)  # PoolDown when it names a pool that is down
        snaps = [s for p in self.pools for s in p.list_snapshots()]
        if request.snapshot_id:
            snaps = [s for s in snaps if s.id == request.snapshot_id]
        if request.source_volume_id:
            snaps = [s for s in snaps if s.source_volume_id == request.source_volume_id]
        page, token = paginate(snaps, lambda s: s.id, request.max_entries,
                               request.starting_token)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot_msg(s))
                     for s in page],
            next_token=token,
        )

    def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetSnapshotResponse:
        check_id(request.snapshot_id, "snapshot_id")
        pool = self.pools.owner(request.snapshot_id)
        snap = pool.get_snapshot(request.snapshot_id) if pool else None
        if snap is None:
            raise NotFound(f"snapshot {request.snapshot_id} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_msg(snap))

