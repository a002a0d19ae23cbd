"""A crash-safe store of volume and snapshot objects in a directory tree.

Each object is a *payload* (an image file for ``filepool``, a directory tree for ``nfs``)
with a JSON metadata file beside it. Objects are built under ``tmp`` and committed by
renaming the payload into place first and the metadata last; removal deletes the metadata
first. So an object exists exactly when its metadata file does, and a crash at any moment
leaves either nothing (stray payloads or temp files, removed by :meth:`ObjectStore.load`)
or a complete object. The in-memory index is rebuilt from the tree at start-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from csi.faults import crashpoint
from csi.pools.base import Snapshot, Source, Volume, parse_id
from csi.pools.index import ObjectIndex
from csi.system import System

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("volumes", "snapshots")


def meta_of(obj: Volume | Snapshot) -> dict[str, Any]:
    meta = asdict(obj)
    meta["version"] = FORMAT_VERSION
    meta["kind"] = "volume" if isinstance(obj, Volume) else "snapshot"
    return meta


def volume_from(meta: dict[str, Any]) -> Volume:
    src = meta.get("source")
    return Volume(
        id=meta["id"], name=meta["name"], pool=meta["pool"], size=int(meta["size"]),
        fs_type=meta.get("fs_type", ""),
        source=Source(src["kind"], src["id"]) if src else None,
        parameters=dict(meta.get("parameters", {})), created=float(meta["created"]),
    )


def snapshot_from(meta: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=meta["id"], name=meta["name"], pool=meta["pool"],
        source_volume_id=meta["source_volume_id"], size=int(meta["size"]),
        created=float(meta["created"]), parameters=dict(meta.get("parameters", {})),
    )


def remove_path(path: str) -> None:
    """Remove a file or a whole tree; missing is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ObjectStore:
    """Volumes and snapshots of one pool under ``dirs`` (``volumes``, ``snapshots``,
    ``tmp``), with payloads named ``<uid><suffix>`` and metadata ``<uid>.json``; what is
    committed is in :attr:`index`."""

    def __init__(self, pool: str, system: System, dirs: dict[str, str], suffix: str,
                 crash_prefix: str) -> None:
        self.pool = pool
        self.system = system
        self.dirs = dirs
        self.suffix = suffix
        self.crash_prefix = crash_prefix
        self.index = ObjectIndex()

    # ---- paths ----------------------------------------------------------------------

    def uid(self, object_id: str, kind: str) -> str | None:
        """The uid of one of this pool's ids of ``kind`` ('vol'/'snap'), else None."""
        parsed = parse_id(object_id)
        if parsed is None or parsed[0] != self.pool or parsed[1] != kind:
            return None
        return parsed[2]

    def path(self, kind: str, object_id: str, meta: bool = False) -> str:
        uid = self.uid(object_id, "vol" if kind == "volumes" else "snap")
        assert uid is not None, object_id
        return os.path.join(self.dirs[kind], uid + (".json" if meta else self.suffix))

    def payload(self, obj: Volume | Snapshot) -> str:
        """Where a committed object's payload is."""
        return self.path("volumes" if isinstance(obj, Volume) else "snapshots", obj.id)

    def tmp_path(self, object_id: str) -> str:
        return os.path.join(self.dirs["tmp"], object_id.split(":", 1)[1] + self.suffix)

    def make_dirs(self) -> None:
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)

    # ---- load and reconcile ---------------------------------------------------------

    def load(self) -> None:
        """Rebuild the index; remove what half-finished work left behind."""
        for entry in os.scandir(self.dirs["tmp"]):
            log.info("pool %s: removing leftover %s", self.pool, entry.path)
            remove_path(entry.path)
        volumes: list[Volume] = []
        snapshots: list[Snapshot] = []
        for kind in KINDS:
            d = self.dirs[kind]
            names = set(os.listdir(d))
            for fname in sorted(names):
                full = os.path.join(d, fname)
                if ".tmp-" in fname:  # an atomic write interrupted before its rename
                    log.info("pool %s: removing interrupted write %s", self.pool, full)
                    remove_path(full)
                    continue
                if fname.endswith(".json"):
                    meta = self._read_meta(full)
                    if meta is None:
                        continue
                    if kind == "volumes":
                        volumes.append(volume_from(meta))
                    else:
                        snapshots.append(snapshot_from(meta))
                    continue
                stem = fname.removesuffix(self.suffix) if self.suffix else fname
                if (fname.endswith(self.suffix) or not self.suffix) and \
                        f"{stem}.json" not in names and len(stem) == 32:
                    log.info("pool %s: removing payload without metadata %s", self.pool, full)
                    remove_path(full)
        self.index.replace_all(volumes, snapshots)
        log.info("pool %s: %d volumes, %d snapshots", self.pool, len(volumes), len(snapshots))

    def _read_meta(self, path: str, quiet: bool = False) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                meta: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            if not quiet:
                log.error("pool %s: metadata %s vanished while loading", self.pool, path)
            return None
        except (OSError, ValueError) as err:
            log.error("pool %s: unreadable metadata %s: %s (left in place)", self.pool, path,
                      err)
            return None
        if meta.get("version") != FORMAT_VERSION or meta.get("pool") != self.pool:
            log.error("pool %s: metadata %s is not of this pool/format (left in place)",
                      self.pool, path)
            return None
        return meta

    # ---- index ----------------------------------------------------------------------

    def reload(self, kind: str, object_id: str) -> Volume | Snapshot | None:
        """Read one object's metadata from the tree into the index (for a store shared
        with other processes, e.g. an NFS export the controller writes and nodes read)."""
        if self.uid(object_id, "vol" if kind == "volumes" else "snap") is None:
            return None
        meta = self._read_meta(self.path(kind, object_id, meta=True), quiet=True)
        if meta is None:
            return None
        obj: Volume | Snapshot = volume_from(meta) if kind == "volumes" else snapshot_from(meta)
        self.index.put(obj)
        return obj

    # ---- changes --------------------------------------------------------------------

    def build(self, obj: Volume | Snapshot, make: Callable[[str], None]) -> None:
        """Build the payload with ``make(tmp_path)`` and commit the object."""
        kind = "volumes" if isinstance(obj, Volume) else "snapshots"
        tmp = self.tmp_path(obj.id)
        try:
            make(tmp)
            self._commit(kind, obj, tmp)
        except BaseException:
            remove_path(tmp)
            remove_path(tmp + ".json")
            raise
        self.index.put(obj)

    def _commit(self, kind: str, obj: Volume | Snapshot, tmp: str) -> None:
        tmp_meta = tmp + ".json"
        self.system.write_atomic(tmp_meta, json.dumps(meta_of(obj), sort_keys=True).encode())
        crashpoint(f"{self.crash_prefix}.{kind}.meta-written")
        os.rename(tmp, self.path(kind, obj.id))
        crashpoint(f"{self.crash_prefix}.{kind}.image-in-place")
        os.rename(tmp_meta, self.path(kind, obj.id, meta=True))
        self.system.fsync_dir(self.dirs[kind])
        crashpoint(f"{self.crash_prefix}.{kind}.committed")

    def update(self, vol: Volume, **changes: Any) -> Volume:
        """Rewrite a volume's metadata atomically (e.g. a new size)."""
        new = replace(vol, **changes)
        self.system.write_atomic(self.path("volumes", vol.id, meta=True),
                                 json.dumps(meta_of(new), sort_keys=True).encode())
        self.index.put(new)
        return new

    def remove(self, kind: str, object_id: str,
               dispose: Callable[[str], None] = remove_path) -> None:
        """Metadata first (the object is gone), then ``dispose(payload)``."""
        if self.uid(object_id, "vol" if kind == "volumes" else "snap") is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(kind, object_id, meta=True))
        self.system.fsync_dir(self.dirs[kind])
        crashpoint(f"{self.crash_prefix}.{kind}.removed.json")
        self.index.drop(object_id)
        payload = self.path(kind, object_id)
        if os.path.lexists(payload):
            dispose(payload)
        self.system.fsync_dir(self.dirs[kind])
