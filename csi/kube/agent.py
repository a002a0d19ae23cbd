"""The node agent: makes this node's FlotillaVolumes and FlotillaSnapshots so.

It watches the resources labelled with its node, drives the real pools, writes status
and Events, and releases the storage finalizer once the storage is gone. Work goes
through a de-duplicating queue (one key is never processed twice at once); every
(re)list of the informers enqueues everything, so a restart or a broken watch resyncs,
and a periodic resync catches what a failed status write left behind. Pool calls are
idempotent, so redoing work is always safe. The node's pools publish their capacity in
the ``FlotillaNode`` named after the node, read by the controller's GetCapacity.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any

from csi import __version__
from csi.errors import Aborted, FlotillaError, InvalidArgument, NotFound, Unavailable
from csi.kube import API_VERSION, FINALIZER, NODE_LABEL, NODES, SNAPSHOTS, VOLUMES
from csi.kube import resources as res
from csi.kube.api import ApiUnavailable, Conflict, KubeApi, Obj
from csi.kube.informer import Informer
from csi.locks import KeyedTryLock
from csi.pools import PoolDown, PoolFailure, PoolSet
from csi.pools.base import Pool, VolumeRequest
from csi.validation import resolve_size

log = logging.getLogger(__name__)

Key = tuple[str, str]
RETRY_SECONDS = 5.0
RESYNC_SECONDS = 300.0


class WorkQueue:
    """client-go's work queue, minimal: a key queued while in progress runs again after."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[Key] = collections.deque()
        self._dirty: set[Key] = set()
        self._processing: set[Key] = set()
        self._shutdown = False

    def add(self, key: Key) -> None:
        with self._cond:
            if self._shutdown or key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: Key, delay: float) -> None:
        timer = threading.Timer(delay, self.add, (key,))
        timer.daemon = True
        timer.start()

    def get(self) -> Key | None:
        with self._cond:
            while not self._queue and not self._shutdown:
                self._cond.wait()
            if self._shutdown:
                return None
            key = self._queue.popleft()
            self._processing.add(key)
            self._dirty.discard(key)
            return key

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._processing


class NodeAgent:
    def __init__(self, api: KubeApi, pools: PoolSet, node_id: str, locks: KeyedTryLock,
                 capacity_interval: float = 30.0, workers: int = 4) -> None:
        self.api = api
        #: every node-local pool, failed ones included (their resources wait for them)
        self.pools = {p.name: p for p in pools.all() if p.node_local}
        self.pool_set = pools
        self._node_obj: Obj | None = None
        self.node_id = node_id
        self.node_object = res.object_name(node_id)
        self.locks = locks
        self.capacity_interval = capacity_interval
        self.queue = WorkQueue()
        selector = f"{NODE_LABEL}={res.label_value(node_id)}"
        self.informers = {
            VOLUMES: Informer(api, VOLUMES, selector, self._on_event(VOLUMES)),
            SNAPSHOTS: Informer(api, SNAPSHOTS, selector, self._on_event(SNAPSHOTS)),
        }
        self._workers = [threading.Thread(target=self._work, name=f"agent-{i}", daemon=True)
                         for i in range(workers)]
        self._stopping = threading.Event()
        self._publish_now = threading.Event()
        self._publisher = threading.Thread(target=self._publish_loop, name="agent-capacity",
                                           daemon=True)

    # ---- lifecycle ------------------------------------------------------------------

    def start(self, sync_timeout: float = 60.0) -> None:
        self.publish_capacity()
        self.pool_set.watch(self._pool_changed, replay=True)
        for inf in self.informers.values():
            inf.start()
        for t in self._workers:
            t.start()
        self._publisher.start()
        for inf in self.informers.values():
            if not inf.wait_synced(sync_timeout):
                raise Unavailable(f"node agent cannot list {inf.plural} ({inf.last_error}); "
                                  "are the Flotilla CRDs installed and the RBAC in place?")
        log.info("node agent for %s watching pools %s", self.node_id,
                 ",".join(self.pools) or "(none)")

    def stop(self) -> None:
        self._stopping.set()
        self._publish_now.set()
        self.queue.shutdown()
        for inf in self.informers.values():
            inf.stop()
        for t in self._workers:
            t.join(timeout=30)
        self._publisher.join(timeout=10)

    def _on_event(self, plural: str) -> Any:
        def handler(kind: str, obj: Obj) -> None:
            if kind != "DELETED":
                self.queue.add((plural, res.meta(obj)["name"]))
        return handler

    def _pool_changed(self, name: str, failure: PoolFailure | None) -> None:
        """A pool failed a start attempt, or started at last: say so on the FlotillaNode
        (an Event, and its status at once); a started pool's resources are redone."""
        if name not in self.pools:
            return
        obj = self._node_obj or {"apiVersion": API_VERSION, "kind": "FlotillaNode",
                                 "metadata": {"name": self.node_object}}
        if failure is None:
            self.api.event(obj, "PoolStarted", f"pool {name!r} started on node "
                           f"{self.node_id}; serving it")
            for plural, inf in self.informers.items():
                for item in inf.items():
                    if res.spec(item).get("pool") == name:
                        self.queue.add((plural, res.meta(item)["name"]))
        else:
            self.api.event(obj, "PoolStartFailed",
                           f"pool {name!r} cannot start on node {self.node_id} (attempt "
                           f"{failure.attempts}, next in {failure.retry_in:.0f}s): "
                           f"{failure.error}", warning=True)
        self._publish_now.set()

    def backup_done(self, snapshot_id: str) -> None:
        """A backup finished (the wiring hands this to the BackupManager): the snapshot's
        status gets its readiness now, not at the next resync."""
        obj = self.informers[SNAPSHOTS].find(
            lambda o: res.status(o).get("snapshotId") == snapshot_id)
        if obj is not None:
            self.queue.add((SNAPSHOTS, res.meta(obj)["name"]))

    # ---- the workers ----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                retry = self.sync(*key)
            except PoolDown as err:  # redone when the pool starts (_pool_changed)
                log.debug("%s %s waits for its pool: %s", key[0], key[1], err)
                retry = False
            except (ApiUnavailable, Conflict, Aborted, Unavailable) as err:
                log.info("%s %s: %s; retrying in %gs", key[0], key[1], err, RETRY_SECONDS)
                retry = True
            except Exception:
                log.exception("syncing %s %s failed", *key)
                retry = True
            finally:
                self.queue.done(key)
            if retry and not self._stopping.is_set():
                self.queue.add_after(key, RETRY_SECONDS)

    def sync(self, plural: str, name: str) -> bool:
        """Reconcile one resource; True asks for a retry later."""
        obj = self.informers[plural].get(name)
        if obj is None:
            return False
        retry = self._sync_volume(obj) if plural == VOLUMES else self._sync_snapshot(obj)
        self._publish_now.set()
        return retry

    def _pool(self, obj: Obj) -> Pool | None:
        """The resource's pool; None: not a node-local pool of this node.

        Raises: PoolDown (the pool is configured here but its start failed)."""
        pool = self.pools.get(str(res.spec(obj).get("pool")))
        if pool is not None and self.pool_set.failure(pool.name) is not None:
            return self.pool_set.named(pool.name)  # raises PoolDown
        return pool

    def _status(self, plural: str, obj: Obj, status: dict[str, Any]) -> None:
        patched = self.api.patch(plural, res.meta(obj)["name"], {"status": status},
                                 status=True)
        if patched is not None:
            self.informers[plural].apply(patched)

    def _release(self, plural: str, obj: Obj, what: str) -> None:
        m = res.meta(obj)
        rest = [f for f in m.get("finalizers") or [] if f != FINALIZER]
        # guarded by resourceVersion: never drop a finalizer someone added meanwhile
        self.api.patch(plural, m["name"], {"metadata": {
            "finalizers": rest, "resourceVersion": m["resourceVersion"]}})
        self.api.event(obj, "Deleted", f"{what} deleted on node {self.node_id}")
        log.info("%s deleted", what)

    def _failed(self, plural: str, obj: Obj, err: FlotillaError, what: str,
                phase: str = res.FAILED) -> None:
        gen = int(res.meta(obj).get("generation", 1))
        status = res.failed_status(err, gen, phase)
        if phase != res.FAILED:  # keep what is known (ids) next to the error
            status = {**res.status(obj), "error": status["error"],
                      "message": status["message"], "observedGeneration": gen,
                      "phase": phase}
        self._status(plural, obj, status)
        self.api.event(obj, "Failed", f"{what}: {err}", warning=True)
        log.warning("%s failed: %s", what, err)

    # ---- volumes --------------------------------------------------------------------

    def _sync_volume(self, obj: Obj) -> bool:
        sp, st = res.spec(obj), res.status(obj)
        gen = int(res.meta(obj).get("generation", 1))
        what = f"volume {sp.get('name')}"
        pool = self._pool(obj)
        if res.deleting(obj):
            if FINALIZER not in (res.meta(obj).get("finalizers") or []):
                return False
            if pool is not None:
                vid = st.get("volumeId")
                if not vid:
                    found = pool.find_volume(sp["name"])
                    vid = found.id if found else None
                if vid:
                    try:
                        with self.locks.hold(vid):
                            pool.delete_volume(vid)
                    except Aborted:
                        return True
                    except FlotillaError as err:
                        self._failed(VOLUMES, obj, err, f"deleting {what}", "DeleteFailed")
                        return True
            self._release(VOLUMES, obj, what)
            return False
        if pool is None:
            if not res.answered(obj):
                self._failed(VOLUMES, obj, InvalidArgument(
                    f"pool {sp.get('pool')!r} is not a node-local pool of node "
                    f"{self.node_id}"), what)
            return False
        if res.answered(obj) and st.get("phase") in (res.READY, res.FAILED):
            return self._check_volume(obj, pool)
        if st.get("phase") != res.READY:
            try:
                vol = pool.create_volume(self._resolved(res.request_of(obj), pool))
            except (Aborted, Unavailable):
                return True
            except FlotillaError as err:
                self._failed(VOLUMES, obj, err, f"creating {what}")
                return False
            self._status(VOLUMES, obj, res.volume_status(vol, gen))
            self.api.event(obj, "Provisioned",
                           f"{what} created as {vol.id} ({vol.size} bytes) on node "
                           f"{self.node_id}")
            log.info("%s created as %s", what, vol.id)
            return False
        vid = st["volumeId"]
        try:
            with self.locks.hold(vid):
                vol = pool.expand_volume(vid, int(sp["size"]))
        except (Aborted, Unavailable):
            return True
        except FlotillaError as err:
            self._status(VOLUMES, obj, {"observedGeneration": gen,
                                        "error": res.error_status(err),
                                        "message": str(err)[:2000]})
            self.api.event(obj, "ExpandFailed", f"expanding {what}: {err}", warning=True)
            return False
        self._status(VOLUMES, obj, res.volume_status(vol, gen))
        self.api.event(obj, "Expanded", f"{what} expanded to {vol.size} bytes")
        return False

    @staticmethod
    def _resolved(req: VolumeRequest, pool: Pool) -> VolumeRequest:
        """The controller rounded the size without knowing this node's pool (it never
        starts it): round it again to the granularity the pool here really has."""
        size = resolve_size(req.required, req.limit, req.size, req.size, pool.granularity)
        return req if size == req.size else dataclasses.replace(req, size=size)

    def _check_volume(self, obj: Obj, pool: Pool) -> bool:
        """Report a Ready volume whose storage went missing (never recreate it)."""
        st = res.status(obj)
        if st.get("phase") != res.READY:
            return False
        cond = (pool.volume_condition(st["volumeId"]) if pool.get_volume(st["volumeId"])
                else None)
        abnormal, message = (True, f"volume {st['volumeId']} is missing from pool "
                             f"{pool.name!r} on node {self.node_id}") if cond is None \
            else (cond.abnormal, cond.message)
        old = st.get("condition") or {}
        if old.get("abnormal", False) != abnormal or old.get("message", "") != message:
            self._status(VOLUMES, obj, {"condition": {"abnormal": abnormal,
                                                      "message": message}})
        return False

    # ---- snapshots ------------------------------------------------------------------

    def _sync_snapshot(self, obj: Obj) -> bool:
        sp, st = res.spec(obj), res.status(obj)
        gen = int(res.meta(obj).get("generation", 1))
        what = f"snapshot {sp.get('name')}"
        pool = self._pool(obj)
        if res.deleting(obj):
            if FINALIZER not in (res.meta(obj).get("finalizers") or []):
                return False
            if pool is not None:
                sid = st.get("snapshotId")
                if not sid:
                    found = pool.find_snapshot(sp["name"])
                    sid = found.id if found else None
                if sid:
                    try:
                        with self.locks.hold(sid):
                            pool.delete_snapshot(sid)  # and its backup (backup/pool.py)
                    except Aborted:
                        return True
                    except FlotillaError as err:
                        self._failed(SNAPSHOTS, obj, err, f"deleting {what}", "DeleteFailed")
                        return True
            self._release(SNAPSHOTS, obj, what)
            return False
        target = (sp.get("parameters") or {}).get("backupTarget")
        if res.answered(obj) and st.get("phase") in (res.READY, res.FAILED) and (
                st.get("phase") == res.FAILED or st.get("readyToUse", True) or not target):
            return False
        if pool is None:
            self._failed(SNAPSHOTS, obj, InvalidArgument(
                f"pool {sp.get('pool')!r} is not a node-local pool of node {self.node_id}"),
                what)
            return False
        source = sp["sourceVolumeId"]
        params = dict(sp.get("parameters") or {})
        try:
            pool.check_snapshot_parameters(params)
            if pool.get_volume(source) is None:
                raise NotFound(f"source volume {source} does not exist on node "
                               f"{self.node_id}")
            with self.locks.hold(source):
                # a backed-up pool starts the backup; the snapshot is ready when it is done
                snap = pool.create_snapshot(sp["name"], source, params)
        except (Aborted, Unavailable):
            return True
        except FlotillaError as err:
            self._failed(SNAPSHOTS, obj, err, f"creating {what} on node {self.node_id}")
            return False
        first = st.get("phase") != res.READY
        status = res.snapshot_status(snap, gen)
        status["message"] = snap.message[:2000]
        if (st.get("readyToUse"), st.get("message", "")) != (snap.ready, status["message"]) \
                or first:
            self._status(SNAPSHOTS, obj, status)
        if first:
            self.api.event(obj, "SnapshotTaken", f"{what} taken as {snap.id} on node "
                           f"{self.node_id}")
            log.info("%s taken as %s", what, snap.id)
        if target and snap.ready and not st.get("readyToUse"):
            self.api.event(obj, "BackedUp", f"{what} backed up to target {target!r}")
        return target is not None and not snap.ready

    # ---- capacity -------------------------------------------------------------------

    def pool_report(self) -> list[dict[str, Any]]:
        out = []
        failures = self.pool_set.failures()
        for pool in self.pools.values():
            entry: dict[str, Any] = {"name": pool.name, "type": pool.type}
            failure = failures.get(pool.name)
            if failure is not None:  # no I/O on a pool that did not start
                entry.update(up=False, started=False, startAttempts=failure.attempts,
                             message=f"start failed: {failure.error}"[:1000])
                out.append(entry)
                continue
            entry["started"] = True
            try:
                pool.check()
                cap = pool.capacity()
            except (FlotillaError, OSError) as err:
                entry.update(up=False, message=str(err)[:1000])
            else:
                entry.update(up=True, size=cap.size, used=cap.used,
                             provisioned=cap.provisioned, available=cap.available,
                             volumes=cap.volumes, snapshots=cap.snapshots, message="")
            out.append(entry)
        return out

    def publish_capacity(self) -> None:
        status = {"pools": self.pool_report(), "heartbeat": time.time(),
                  "capacityInterval": self.capacity_interval, "nodeID": self.node_id,
                  "driverVersion": __version__}
        patched = self.api.patch(NODES, self.node_object, {"status": status}, status=True)
        if patched is None:
            with contextlib.suppress(Conflict):
                self.api.create(NODES, {"apiVersion": API_VERSION, "kind": "FlotillaNode",
                                        "metadata": {"name": self.node_object},
                                        "spec": {"nodeID": self.node_id}})
            patched = self.api.patch(NODES, self.node_object, {"status": status}, status=True)
        if patched is not None:
            self._node_obj = patched  # what Events about this node's pools refer to

    def _publish_loop(self) -> None:
        last_resync = time.monotonic()
        while not self._stopping.is_set():
            self._publish_now.wait(self.capacity_interval)
            self._publish_now.clear()
            if self._stopping.is_set():
                return
            try:
                self.publish_capacity()
            except Exception as err:
                log.warning("cannot publish capacity of node %s: %s", self.node_id, err)
            if time.monotonic() - last_resync > RESYNC_SECONDS:
                last_resync = time.monotonic()
                for plural, inf in self.informers.items():
                    for obj in inf.items():
                        self.queue.add((plural, res.meta(obj)["name"]))
            self._stopping.wait(1.0)  # at most one publication a second
