"""Backups inside the driver: snapshots backed up in the background, volumes restored
from a target on whichever node needs them, manifests deleted and chunks collected.

Used by the ControllerService in ``--mode all`` and by the node agent in ``--mode node``
(the node that holds a snapshot backs it up; any node restores). The ``backupTarget``
parameter of a snapshot names the target; the backup's id is the snapshot's id.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from csi.backup import engine
from csi.backup.targets import Target
from csi.errors import (
    AlreadyExists,
    FlotillaError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    Unavailable,
)
from csi.pools import BACKUP_POOL_TYPES
from csi.pools.base import Pool, Snapshot, Source, Volume, VolumeRequest, check_compatible

log = logging.getLogger(__name__)

BACKUP_PARAMETER = "backupTarget"
#: recorded in a restored volume's parameters (the pool cannot know the remote source)
RESTORED_FROM = "flotilla.csi.io/restoredFrom"
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class BackupMetrics:
    """``flotilla_backup_*`` series (registered in the driver's registry)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry}
        self.uploaded = Counter("flotilla_backup_uploaded_bytes",
                                "Bytes (compressed) uploaded to backup targets",
                                ["target"], **kw)
        self.downloaded = Counter("flotilla_backup_downloaded_bytes",
                                  "Bytes (compressed) downloaded from backup targets",
                                  ["target"], **kw)
        self.dedup = Counter("flotilla_backup_chunks_deduplicated",
                             "Chunks a backup found already in the target", ["target"], **kw)
        self.chunks = Counter("flotilla_backup_chunks_uploaded",
                              "Chunks uploaded to backup targets", ["target"], **kw)
        self.backups = Counter("flotilla_backup_operations",
                               "Backups finished, by result", ["target", "result"], **kw)
        self.restores = Counter("flotilla_restore_operations",
                                "Restores from a backup target, by result",
                                ["target", "result"], **kw)
        self.backup_seconds = Histogram("flotilla_backup_duration_seconds",
                                        "Duration of backups", ["target"],
                                        buckets=DURATION_BUCKETS, **kw)
        self.restore_seconds = Histogram("flotilla_restore_duration_seconds",
                                         "Duration of restores from a backup target",
                                         ["target"], buckets=DURATION_BUCKETS, **kw)
        self.last_success = Gauge("flotilla_backup_last_success_timestamp_seconds",
                                  "Unix time of the last successful backup of a volume",
                                  ["target", "volume"], **kw)
        self.running = Gauge("flotilla_backup_running", "Backups in progress", ["target"],
                             **kw)


class Job:
    def __init__(self, snapshot_id: str, target: str) -> None:
        self.snapshot_id = snapshot_id
        self.target = target
        self.interrupt = threading.Event()
        self.future: concurrent.futures.Future[engine.BackupStats] | None = None


class BackupManager:
    """See the module docstring. Thread-safe."""

    def __init__(self, targets: dict[str, Target], state_dir: str, node_id: str,
                 registry: CollectorRegistry | None = None, workers: int = 2) -> None:
        self.targets = targets
        self.node_id = node_id
        self.restore_dir = os.path.join(state_dir, "backup-restores")
        self.metrics = BackupMetrics(registry)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="backup")
        # garbage collection lists whole targets: never inside a CSI call
        self._gc_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="backup-gc")
        self._gc_queued: set[str] = set()
        self._mutex = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._errors: dict[str, str] = {}
        self._done: set[str] = set()
        self._gc_pending: set[str] = set()
        self.on_done: Callable[[str], None] | None = None  # called with the snapshot id
        self._cleared: set[str] = set()

    # ---- targets --------------------------------------------------------------------

    def target(self, name: str) -> Target:
        target = self.targets.get(name)
        if target is None:
            known = ", ".join(self.targets) or "none configured"
            raise InvalidArgument(f"parameter {BACKUP_PARAMETER}={name!r} names no "
                                  f"configured backup target ({known})")
        return target

    def _first_use(self, target: Target) -> None:
        """Once per process and target: drop the leases a crash of this node left."""
        with self._mutex:
            if target.name in self._cleared:
                return
            self._cleared.add(target.name)
        try:
            n = engine.clear_dead_leases(target, self.node_id)
        except Unavailable as err:
            with self._mutex:
                self._cleared.discard(target.name)
            log.warning("target %s: cannot check for dead leases: %s", target.name, err)
            return
        if n:
            log.info("target %s: removed %d lease(s) of an earlier run of this node",
                     target.name, n)

    def check_snapshot_parameters(self, pool: Pool, params: dict[str, str]) -> None:
        name = params.get(BACKUP_PARAMETER)
        if name is None:
            return
        self.target(name)
        if not pool.backups:
            raise InvalidArgument(f"pool {pool.name!r} is a {pool.type} pool: backups "
                                  f"({BACKUP_PARAMETER}) are for {', '.join(BACKUP_POOL_TYPES)}"
                                  " pools")

    def stop(self) -> None:
        with self._mutex:
            for job in self._jobs.values():
                job.interrupt.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._gc_executor.shutdown(wait=True, cancel_futures=True)
        for t in self.targets.values():
            t.close()

    # ---- backups --------------------------------------------------------------------

    def ensure_backup(self, pool: Pool, snap: Snapshot) -> tuple[bool, str]:
        """(ready, message): start the backup of ``snap`` unless done or running."""
        name = snap.parameters.get(BACKUP_PARAMETER)
        if not name:
            return True, ""
        target = self.target(name)
        with self._mutex:
            if snap.id in self._done:
                return True, ""
            job = self._jobs.get(snap.id)
            if job is not None:
                return False, f"backup to {name!r} in progress"
            error = self._errors.pop(snap.id, "")
        if not error and target.exists(engine.manifest_key(snap.id)):
            with self._mutex:
                self._done.add(snap.id)
            return True, ""
        job = Job(snap.id, name)
        with self._mutex:
            if snap.id in self._jobs:
                return False, f"backup to {name!r} in progress"
            self._jobs[snap.id] = job
        job.future = self._executor.submit(self._run_backup, job, pool, snap, target)
        message = f"backup to {name!r} started"
        if error:
            message += f" again (the last attempt failed: {error})"
        return False, message

    def backup_state(self, snap: Snapshot) -> tuple[bool, str]:
        """Like :meth:`ensure_backup` without starting anything (for Get/ListSnapshots)."""
        name = snap.parameters.get(BACKUP_PARAMETER)
        if not name:
            return True, ""
        with self._mutex:
            if snap.id in self._done:
                return True, ""
            if snap.id in self._jobs:
                return False, "backup in progress"
            if snap.id in self._errors:
                return False, self._errors[snap.id]
        target = self.targets.get(name)
        try:
            ready = target is not None and target.exists(engine.manifest_key(snap.id))
        except Unavailable as err:
            return False, str(err)
        if ready:
            with self._mutex:
                self._done.add(snap.id)
        return ready, ""

    def wait(self, snapshot_id: str, timeout: float | None = None) -> None:
        with self._mutex:
            job = self._jobs.get(snapshot_id)
        if job is not None and job.future is not None:
            with contextlib.suppress(Exception):
                job.future.result(timeout)

    def _run_backup(self, job: Job, pool: Pool, snap: Snapshot,
                    target: Target) -> engine.BackupStats:
        m = self.metrics
        m.running.labels(target.name).inc()
        start = time.monotonic()
        try:
            self._first_use(target)
            fs_type = ""
            with contextlib.suppress(Exception):
                vol = pool.get_volume(snap.source_volume_id)
                fs_type = vol.fs_type if vol else ""
            manifest = engine.Manifest(
                id=snap.id, size=snap.size, chunks=[], snapshot_name=snap.name,
                source_volume_id=snap.source_volume_id, pool=pool.name, pool_type=pool.type,
                node=self.node_id, fs_type=fs_type, created=snap.created)
            with pool.read_snapshot(snap.id) as path:
                stats = engine.backup_image(target, path, manifest, self.node_id,
                                            interrupt=job.interrupt)
        except Exception as err:
            m.backups.labels(target.name, "failure").inc()
            log.warning("backup of snapshot %s to %s failed: %s", snap.id, target.name, err)
            with self._mutex:
                self._errors[snap.id] = str(err)[:1000]
                self._jobs.pop(snap.id, None)
            self._notify(snap.id)
            raise
        finally:
            m.running.labels(target.name).dec()
        m.uploaded.labels(target.name).inc(stats.uploaded_bytes)
        m.chunks.labels(target.name).inc(stats.uploaded_chunks)
        m.dedup.labels(target.name).inc(stats.dedup_chunks)
        m.backups.labels(target.name, "success").inc()
        m.backup_seconds.labels(target.name).observe(time.monotonic() - start)
        m.last_success.labels(target.name, snap.source_volume_id).set(time.time())
        with self._mutex:
            self._done.add(snap.id)
            self._jobs.pop(snap.id, None)
            gc_now = target.name in self._gc_pending and not any(
                j.target == target.name for j in self._jobs.values())
        if gc_now:
            self._schedule_gc(target)
        self._notify(snap.id)
        return stats

    def _notify(self, snapshot_id: str) -> None:
        if self.on_done is not None:
            try:
                self.on_done(snapshot_id)
            except Exception:
                log.exception("backup completion callback failed")

    # ---- deletion -------------------------------------------------------------------

    def delete_backup(self, snapshot_id: str, target_name: str) -> None:
        """Remove the backup's manifest (stopping a running upload first), then collect
        the chunks no other backup uses; deferred while backups run."""
        target = self.target(target_name)
        with self._mutex:
            job = self._jobs.get(snapshot_id)
        if job is not None:
            job.interrupt.set()
            if job.future is not None:
                with contextlib.suppress(Exception):
                    job.future.result()
        engine.delete_backup(target, snapshot_id)
        with self._mutex:
            self._done.discard(snapshot_id)
            self._errors.pop(snapshot_id, None)
        self._schedule_gc(target)

    def _schedule_gc(self, target: Target) -> None:
        """Collect garbage in the background (once, however many deletions asked)."""
        with self._mutex:
            if target.name in self._gc_queued:
                return
            self._gc_queued.add(target.name)
        try:
            self._gc_executor.submit(self._collect, target)
        except RuntimeError:  # shutting down
            with self._mutex:
                self._gc_queued.discard(target.name)

    def _collect(self, target: Target) -> None:
        with self._mutex:
            self._gc_pending.discard(target.name)
            self._gc_queued.discard(target.name)
        self._first_use(target)
        try:
            result = engine.collect_garbage(target, self.node_id)
        except Exception as err:
            log.warning("garbage collection in %s failed (retried after the next backup "
                        "or deletion): %s", target.name, err)
            result = engine.GcResult(deferred=True)
        if result.deferred:
            with self._mutex:
                self._gc_pending.add(target.name)

    # ---- restores -------------------------------------------------------------------

    def find_backup(self, snapshot_id: str) -> tuple[Target, engine.Manifest] | None:
        """The target holding a backup with this id, and its manifest (checked)."""
        for target in self.targets.values():
            try:
                if target.exists(engine.manifest_key(snapshot_id)):
                    return target, engine.read_manifest(target, snapshot_id)
            except NotFound:
                continue
        return None

    def create_volume(self, pool: Pool, req: VolumeRequest) -> Volume:
        """``pool.create_volume``, except that a snapshot source this pool does not hold
        is restored from the backup target that has it."""
        src = req.source
        if src is None or src.kind != "snapshot" or pool.get_snapshot(src.id) is not None:
            return pool.create_volume(req)
        found = self.find_backup(src.id)
        if found is None:
            return pool.create_volume(req)  # NotFound from the pool, as before
        return self.restore_volume(pool, req, *found)

    def _marker(self, name: str) -> str:
        return os.path.join(self.restore_dir,
                            hashlib.sha256(name.encode()).hexdigest() + ".json")

    def restore_volume(self, pool: Pool, req: VolumeRequest, target: Target,
                       manifest: engine.Manifest) -> Volume:
        """Create volume ``req.name`` with the content of a backup (idempotent).

        The volume is created empty, then written; a marker file in the state directory
        says a restore is under way, so one interrupted by a crash is redone from scratch,
        and a failed one (e.g. a corrupt chunk) deletes the volume: nothing half-made.
        """
        assert req.source is not None
        if req.size < manifest.size:
            raise OutOfRange(f"requested {req.size} bytes is smaller than the backup's "
                             f"{manifest.size} bytes")
        params = {**req.parameters, RESTORED_FROM: req.source.id}
        inner = replace(req, source=None, parameters=params)
        marker = self._marker(req.name)
        existing = pool.find_volume(req.name)
        if existing is not None:
            if existing.parameters.get(RESTORED_FROM) != req.source.id:
                raise AlreadyExists(f"volume {req.name!r} exists with a different content "
                                    "source")
            if not os.path.exists(marker):
                vol = self._outer(existing, req)
                check_compatible(vol, req)
                return vol
            log.info("volume %s: redoing an interrupted restore", req.name)
            pool.delete_volume(existing.id)
        os.makedirs(self.restore_dir, exist_ok=True)
        with open(marker, "w") as f:
            json.dump({"name": req.name, "source": req.source.id, "target": target.name}, f)
        m = self.metrics
        start = time.monotonic()
        vol = pool.create_volume(inner)
        try:
            downloaded = self._write_volume(pool, vol, target, manifest)
        except BaseException as err:
            m.restores.labels(target.name, "failure").inc()
            log.warning("restore of %s into volume %s failed: %s", manifest.id, vol.id, err)
            with contextlib.suppress(FlotillaError, OSError):
                pool.delete_volume(vol.id)
            with contextlib.suppress(OSError):
                os.unlink(marker)
            raise
        os.unlink(marker)
        m.restores.labels(target.name, "success").inc()
        m.downloaded.labels(target.name).inc(downloaded)
        m.restore_seconds.labels(target.name).observe(time.monotonic() - start)
        log.info("restored backup %s from %s into volume %s (%d bytes downloaded)",
                 manifest.id, target.name, vol.id, downloaded)
        return self._outer(vol, req)

    @staticmethod
    def _outer(vol: Volume, req: VolumeRequest) -> Volume:
        params = {k: v for k, v in vol.parameters.items() if k != RESTORED_FROM}
        return replace(vol, source=req.source, parameters=params)

    def _write_volume(self, pool: Pool, vol: Volume, target: Target,
                      manifest: engine.Manifest) -> int:
        with pool.write_volume(vol.id) as path:
            fd = os.open(path, os.O_WRONLY)
            try:
                return engine.restore_to_fd(target, manifest, fd, fresh=True)
            finally:
                os.close(fd)

    def forget(self, snapshot_id: str) -> None:
        """Delete the backup of a snapshot no pool here holds, wherever it is."""
        found = self.find_backup(snapshot_id)
        if found is not None:
            self.delete_backup(snapshot_id, found[0].name)

    def source_of(self, snapshot_id: str) -> tuple[Source, int] | None:
        """For CreateVolume: a snapshot known only as a backup (its source, its size)."""
        found = self.find_backup(snapshot_id)
        if found is None:
            return None
        return Source("snapshot", snapshot_id), found[1].size
