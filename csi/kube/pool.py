"""The controller's stand-in for a node-local pool: intent in, status out.

:class:`KubePool` implements the :class:`~csi.pools.base.Pool` interface, so the
ControllerService drives it like any pool. Each mutating call writes a custom resource
(or patches its spec, or deletes it) and waits, at most ``timeout`` seconds, for the
node agent to answer in its status. A timeout raises :class:`InProgress` (ABORTED,
retryable); the retry finds the same resource by name and waits again, so a slow node
never produces a duplicate. Reads come from the informers' caches.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from csi.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FlotillaError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from csi.kube import NODES, SNAPSHOTS, VOLUMES
from csi.kube import resources as res
from csi.kube.api import ApiUnavailable, Conflict, KubeApi, Obj
from csi.kube.informer import Informer
from csi.pools.base import (
    Capacity,
    Condition,
    Placement,
    Pool,
    Snapshot,
    Volume,
    VolumeRequest,
    check_compatible,
)

if TYPE_CHECKING:
    from csi.backup.manager import BackupManager

log = logging.getLogger(__name__)

#: a FlotillaNode whose heartbeat is older than this many capacity intervals is stale
STALE_INTERVALS = 3


class InProgress(Aborted):
    """The node agent has not answered yet; the same call later picks up the result."""


class KubeState:
    """What all KubePools of one controller share: the API and three informers."""

    def __init__(self, api: KubeApi, timeout: float = 45.0,
                 capacity_interval: float = 30.0) -> None:
        self.api = api
        self.timeout = timeout
        self.capacity_interval = capacity_interval
        self.volumes = Informer(api, VOLUMES)
        self.snapshots = Informer(api, SNAPSHOTS)
        self.nodes = Informer(api, NODES)

    def start(self, sync_timeout: float = 60.0) -> None:
        for inf in (self.volumes, self.snapshots, self.nodes):
            inf.start()
        for inf in (self.volumes, self.snapshots, self.nodes):
            if not inf.wait_synced(sync_timeout):
                raise Unavailable(f"cannot list {inf.plural} from the API server within "
                                  f"{sync_timeout:g}s ({inf.last_error or 'no answer'}); "
                                  "are the Flotilla CRDs installed and the RBAC in place?")

    def stop(self) -> None:
        for inf in (self.volumes, self.snapshots, self.nodes):
            inf.stop()

    def check(self) -> None:
        for inf in (self.volumes, self.snapshots, self.nodes):
            if not inf.synced:
                raise Unavailable(f"not synced with the API server ({inf.plural}: "
                                  f"{inf.last_error or 'listing'})")

    def node_pools(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node -> pool -> published capacity, for nodes with a fresh heartbeat."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        now = time.time()
        for obj in self.nodes.items():
            st = res.status(obj)
            interval = float(st.get("capacityInterval", self.capacity_interval))
            beat = float(st.get("heartbeat", 0))
            if now - beat > STALE_INTERVALS * max(interval, 1.0):
                continue
            out[res.meta(obj)["name"]] = {p["name"]: p for p in st.get("pools") or []}
        return out


class KubePool(Pool):
    """A node-local pool seen from the controller (see the module docstring).

    ``template`` is the pool as configured (never started here: its capabilities are
    those of its type; the node that provisions rounds sizes to its own granularity).
    The node agents drive the storage and its backups; ``backups`` (the controller's
    view of the configured targets, kept as ``catalog``) checks ``backupTarget``
    parameters and finds the snapshots known only through a backup, which restore on
    any node.
    """

    def __init__(self, template: Pool, state: KubeState,
                 backups: BackupManager | None = None) -> None:
        super().__init__(template.name, template.options)
        self.take_capabilities(template)
        self.state = state
        self.catalog = backups

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """The shared :class:`KubeState` is started once by the wiring."""

    def check(self) -> None:
        self.state.check()

    # ---- helpers --------------------------------------------------------------------

    def _mine(self, obj: Obj) -> bool:
        return res.spec(obj).get("pool") == self.name

    def _volume_obj(self, volume_id: str) -> Obj | None:
        return self.state.volumes.find(
            lambda o: res.status(o).get("volumeId") == volume_id and self._mine(o))

    def _snapshot_obj(self, snapshot_id: str) -> Obj | None:
        return self.state.snapshots.find(
            lambda o: res.status(o).get("snapshotId") == snapshot_id and self._mine(o))

    def _refuse_if_down(self, node: str) -> None:
        """UNAVAILABLE at once, naming the start error, when the pool failed to start on
        ``node`` (its agent published so): no waiting for an answer that cannot come."""
        entry = self.state.node_pools().get(node, {}).get(self.name)
        if entry is not None and entry.get("started") is False:
            raise Unavailable(f"pool {self.name!r} is not serving on node {node}: "
                              f"{entry.get('message') or 'its start failed'}; the node "
                              "plugin retries the start in the background")

    def node_of(self, volume_id: str) -> str | None:
        obj = self._volume_obj(volume_id)
        return res.spec(obj).get("node") if obj else None

    def _wait(self, inf: Informer, name: str, what: str,
              done: Any) -> Obj | None:
        """Wait until ``done(obj or None)`` holds for the named object; InProgress else."""
        def pred(store: dict[str, Obj]) -> tuple[Obj | None] | None:
            obj = store.get(name)
            return (obj,) if done(obj) else None

        found = inf.wait_for(pred, self.state.timeout)
        if found is None:
            raise InProgress(f"{what} is not finished after {self.state.timeout:g}s (node "
                             "agent busy or down); retry later")
        result: Obj | None = found[0]
        return result

    def _create(self, inf: Informer, body: Obj) -> Obj:
        try:
            obj = self.state.api.create(inf.plural, body)
        except Conflict:
            existing = self.state.api.get(inf.plural, body["metadata"]["name"])
            if existing is None:
                raise InProgress(f"{body['metadata']['name']} is being replaced; "
                                 "retry later") from None
            obj = existing
        except ApiUnavailable as err:
            raise Unavailable(str(err)) from None
        inf.apply(obj)
        return obj

    def _delete(self, inf: Informer, name: str, what: str) -> None:
        """Delete and wait until the node agent released the finalizer."""
        try:
            self.state.api.delete(inf.plural, name)
        except ApiUnavailable as err:
            raise Unavailable(str(err)) from None

        def gone_or_failed(obj: Obj | None) -> bool:
            return obj is None or bool(res.status(obj).get("error") and res.deleting(obj)
                                       and res.status(obj).get("phase") == "DeleteFailed")

        obj = self._wait(inf, name, what, gone_or_failed)
        if obj is not None:
            res.raise_error(res.status(obj)["error"], f"{what} could not be deleted")

    # ---- volumes --------------------------------------------------------------------

    def create_volume(self, req: VolumeRequest) -> Volume:
        place = req.placement
        name = res.object_name(req.name)
        existing = self.state.volumes.get(name) or self.state.api.get(VOLUMES, name)
        if existing is not None:
            node = res.spec(existing).get("node", "")
            if (res.status(existing).get("phase") != res.READY and not res.deleting(existing)
                    and req.source is None and not place.allows(node)):
                # a retry after rescheduling: the unfinished attempt on the old node goes
                log.info("volume %s: replacing the unfinished attempt on node %s", req.name,
                         node)
                self.state.api.delete(VOLUMES, name)
                raise InProgress(f"volume {req.name!r} moves from node {node}; retry later")
            return self._resume_create(existing, req)
        node = self._choose_node(req, place)
        self._refuse_if_down(node)
        obj = self._create(self.state.volumes, res.volume_body(req, self.name, node))
        return self._resume_create(obj, req)

    def _choose_node(self, req: VolumeRequest, place: Placement) -> str:
        if req.source is not None:  # restores and clones land where their source is
            src = (self._snapshot_obj(req.source.id) if req.source.kind == "snapshot"
                   else self._volume_obj(req.source.id))
            if src is None:
                backed_up = req.source.kind == "snapshot" and self.catalog is not None \
                    and self.catalog.find_backup(req.source.id) is not None
            else:
                backed_up = bool((res.spec(src).get("parameters") or {}).get("backupTarget"))
            if src is None and not backed_up:
                raise NotFound(f"source {req.source.kind} {req.source.id} does not exist")
            node = str(res.spec(src)["node"]) if src is not None else ""
            if backed_up:
                # a backed-up snapshot restores on any node, so the scheduler's pick wins:
                # that node's agent clones it when local, else reads the backup target
                chosen = place.choose()
                if chosen is not None:
                    return chosen
                if not node:
                    raise InvalidArgument("a volume restored from a backup needs "
                                          "accessibility_requirements naming a node")
            if not place.allows(node):
                raise ResourceExhausted(
                    f"the source {req.source.kind} lives on node {node}, which the "
                    "volume's topology requirement excludes; node-local volumes are "
                    "restored and cloned on their source's node")
            return node
        picked = place.choose()
        if picked is None:
            raise InvalidArgument(f"pool {self.name!r} is node-local: CreateVolume needs "
                                  "accessibility_requirements naming a node (use a "
                                  "StorageClass with volumeBindingMode WaitForFirstConsumer)")
        return picked

    def _resume_create(self, obj: Obj, req: VolumeRequest) -> Volume:
        name = res.meta(obj)["name"]
        sp = res.spec(obj)
        if sp.get("pool") != self.name:
            raise AlreadyExists(f"volume {req.name!r} exists in pool {sp.get('pool')!r}, "
                                f"not {self.name!r}")
        if res.deleting(obj):
            raise InProgress(f"volume {req.name!r} is being deleted; retry later")
        st = res.status(obj)
        if st.get("phase") == res.READY:
            check_compatible(res.volume_of(obj), req)
            return res.volume_of(obj)
        if res.request_of(obj) != req and st.get("phase") != res.FAILED:
            raise AlreadyExists(f"volume {req.name!r} is being created with a different "
                                "request")
        done = self._wait(self.state.volumes, name, f"creation of volume {req.name!r}",
                          lambda o: o is None or res.answered(o) or res.deleting(o))
        if done is None or res.deleting(done):
            raise InProgress(f"volume {req.name!r} was removed meanwhile; retry")
        st = res.status(done)
        if st.get("phase") == res.READY:
            vol = res.volume_of(done)
            check_compatible(vol, req)
            return vol
        # Failed: remove the resource so a retry (maybe on another node) starts afresh
        error = st.get("error") or {"reason": "Internal", "message": "unknown failure"}
        try:
            self.state.api.delete(VOLUMES, name)
        except ApiUnavailable as err:
            log.warning("cannot delete failed volume resource %s: %s", name, err)
        res.raise_error(error, f"volume {req.name!r} on node {res.spec(done)['node']}")
        raise AssertionError("unreachable")

    def delete_volume(self, volume_id: str) -> None:
        obj = self._volume_obj(volume_id)
        if obj is None:
            return
        if self.state.snapshots.find(
                lambda o: res.spec(o).get("sourceVolumeId") == volume_id):
            log.info("deleting volume %s; its snapshots stay", volume_id)
        self._refuse_if_down(str(res.spec(obj).get("node", "")))
        self._delete(self.state.volumes, res.meta(obj)["name"], f"volume {volume_id}")

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        obj = self._volume_obj(volume_id)
        if obj is None:
            raise NotFound(f"volume {volume_id} does not exist")
        name = res.meta(obj)["name"]
        self._refuse_if_down(str(res.spec(obj).get("node", "")))
        if size > int(res.spec(obj)["size"]):
            try:
                patched = self.state.api.patch(VOLUMES, name, {"spec": {"size": size}})
            except ApiUnavailable as err:
                raise Unavailable(str(err)) from None
            if patched is None:
                raise NotFound(f"volume {volume_id} does not exist")
            self.state.volumes.apply(patched)
        done = self._wait(self.state.volumes, name, f"expansion of volume {volume_id}",
                          lambda o: o is None or res.answered(o))
        if done is None:
            raise NotFound(f"volume {volume_id} was deleted meanwhile")
        st = res.status(done)
        if st.get("error"):
            res.raise_error(st["error"], f"expansion of volume {volume_id}")
        return res.volume_of(done)

    def get_volume(self, volume_id: str) -> Volume | None:
        obj = self._volume_obj(volume_id)
        if obj is None or res.status(obj).get("phase") != res.READY:
            return None
        return res.volume_of(obj)

    def find_volume(self, name: str) -> Volume | None:
        obj = self.state.volumes.get(res.object_name(name))
        if obj is None or not self._mine(obj) or res.status(obj).get("phase") != res.READY:
            return None
        return res.volume_of(obj)

    def list_volumes(self) -> list[Volume]:
        return [res.volume_of(o) for o in self.state.volumes.items()
                if self._mine(o) and res.status(o).get("phase") == res.READY]

    def volume_condition(self, volume_id: str) -> Condition:
        obj = self._volume_obj(volume_id)
        if obj is None:
            return Condition(True, "volume resource is missing")
        cond = res.status(obj).get("condition") or {}
        if cond.get("abnormal"):
            return Condition(True, str(cond.get("message", "abnormal")))
        node = res.spec(obj).get("node")
        if node not in self.state.node_pools():
            return Condition(True, f"node agent on {node} has not reported recently")
        return Condition(False, "volume is healthy")

    # ---- snapshots ------------------------------------------------------------------

    def check_snapshot_parameters(self, parameters: dict[str, str]) -> None:
        if self.catalog is None:
            super().check_snapshot_parameters(parameters)
        else:
            self.catalog.check_snapshot_parameters(self, parameters)

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        oname = res.object_name(name)
        obj = self.state.snapshots.get(oname) or self.state.api.get(SNAPSHOTS, oname)
        if obj is None:
            src = self._volume_obj(source_volume_id)
            if src is None:
                raise NotFound(f"source volume {source_volume_id} does not exist")
            node = res.spec(src)["node"]
            self._refuse_if_down(node)
            obj = self._create(self.state.snapshots, res.snapshot_body(
                name, source_volume_id, parameters, self.name, node))
        sp = res.spec(obj)
        if sp.get("sourceVolumeId") != source_volume_id:
            raise AlreadyExists(f"snapshot {name!r} exists for volume "
                                f"{sp.get('sourceVolumeId')}, not {source_volume_id}")
        if res.deleting(obj):
            raise InProgress(f"snapshot {name!r} is being deleted; retry later")
        done = self._wait(self.state.snapshots, oname, f"snapshot {name!r}",
                          lambda o: o is None or res.answered(o) or res.deleting(o))
        if done is None or res.deleting(done):
            raise InProgress(f"snapshot {name!r} was removed meanwhile; retry")
        st = res.status(done)
        if st.get("phase") == res.READY:
            return res.snapshot_of(done)
        error = st.get("error") or {"reason": "Internal", "message": "unknown failure"}
        try:
            self.state.api.delete(SNAPSHOTS, oname)
        except ApiUnavailable as err:
            log.warning("cannot delete failed snapshot resource %s: %s", oname, err)
        res.raise_error(error, f"snapshot {name!r}")
        raise AssertionError("unreachable")

    def delete_snapshot(self, snapshot_id: str) -> None:
        obj = self._snapshot_obj(snapshot_id)
        if obj is None:
            return
        self._refuse_if_down(str(res.spec(obj).get("node", "")))
        self._delete(self.state.snapshots, res.meta(obj)["name"], f"snapshot {snapshot_id}")

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        obj = self._snapshot_obj(snapshot_id)
        if obj is None or res.status(obj).get("phase") != res.READY:
            return None
        return res.snapshot_of(obj)

    def find_snapshot(self, name: str) -> Snapshot | None:
        obj = self.state.snapshots.get(res.object_name(name))
        if obj is None or not self._mine(obj) or res.status(obj).get("phase") != res.READY:
            return None
        return res.snapshot_of(obj)

    def list_snapshots(self) -> list[Snapshot]:
        return [res.snapshot_of(o) for o in self.state.snapshots.items()
                if self._mine(o) and res.status(o).get("phase") == res.READY]

    # ---- capacity -------------------------------------------------------------------

    def capacity_on(self, node: str) -> Capacity | None:
        """What the node agent on ``node`` last published for this pool (None: nothing
        fresh, or the pool is down there)."""
        entry = self.state.node_pools().get(node, {}).get(self.name)
        if entry is None or not entry.get("up", False):
            return None
        return Capacity(size=int(entry.get("size", 0)), used=int(entry.get("used", 0)),
                        provisioned=int(entry.get("provisioned", 0)),
                        available=int(entry.get("available", 0)),
                        volumes=int(entry.get("volumes", 0)),
                        snapshots=int(entry.get("snapshots", 0)))

    def capacity(self) -> Capacity:
        """Summed over the nodes; ``available`` is the largest single-node headroom."""
        caps = [c for n in self.state.node_pools() if (c := self.capacity_on(n))]
        return Capacity(size=sum(c.size for c in caps), used=sum(c.used for c in caps),
                        provisioned=sum(c.provisioned for c in caps),
                        available=max((c.available for c in caps), default=0),
                        volumes=sum(c.volumes for c in caps),
                        snapshots=sum(c.snapshots for c in caps))

    # ---- node side: not here --------------------------------------------------------

    def _node_only(self, what: str) -> FlotillaError:
        return FailedPrecondition(f"{what} runs in the node plugin, not the controller")

    def attach(self, volume_id: str) -> str:
        raise self._node_only("attach")

    def detach(self, volume_id: str) -> None:
        raise self._node_only("detach")

    def device_of(self, volume_id: str) -> str | None:
        return None

    def refresh_device(self, volume_id: str) -> int:
        raise self._node_only("refresh_device")
