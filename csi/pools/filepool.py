"""``filepool``: sparse image files on a reflink filesystem, attached as loop devices.

Layout under the pool's ``path``::

    volumes/<uid>.img   volumes/<uid>.json     one volume: sparse image + metadata
    snapshots/<uid>.img snapshots/<uid>.json   one snapshot: read-only reflink copy
    tmp/                                       objects being built (removed at start)
    .flotilla.lock                             flock: one process per pool

An object exists exactly when its ``.json`` is in place. Creation builds image and
metadata in ``tmp/`` and renames the image first, the metadata last; deletion removes
the metadata first. So a crash leaves either nothing (stray files that :meth:`start`
removes) or a complete object. Snapshots, clones and restores are ``FICLONE``: they
share extents and cost O(extents); deleting one never affects another.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from csi.faults import crashpoint
from csi.pools.base import (
    Capacity,
    Condition,
    Options,
    Pool,
    Snapshot,
    Source,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
    parse_id,
)
from csi.system import System

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class FilePool(Pool):
    type = "filepool"

    def __init__(self, name: str, options: dict[str, object], system: System) -> None:
        super().__init__(name, options)
        self.system = system
        opts = Options(name, options)
        self.path = os.path.abspath(opts.text("path"))
        self.overprovision_ratio = opts.number("overprovision_ratio", 10.0, 0.01, 1000.0)
        self.max_used_percent = opts.number("max_used_percent", 90.0, 1.0, 100.0)
        self.default_size = opts.size("default_volume_size", 1 << 30) or (1 << 30)
        self.loop_image_size = opts.size("loop_image_size", None)
        # online discard punches holes in the sparse image: deleted data goes back
        self.mount_options = ("discard",) if opts.flag("discard", True) else ()
        opts.finish()
        self.backing_image = self.path.rstrip("/") + ".xfs"
        self._mutex = threading.Lock()
        self._volumes: dict[str, Volume] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._reserved = 0
        self._lock_fd: int | None = None
        self._dirs = {k: os.path.join(self.path, k) for k in ("volumes", "snapshots", "tmp")}

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        if not self.system.supports_reflink(self.path):
            if self.loop_image_size is None:
                raise Unavailable(
                    f"pool {self.name!r}: {self.path} is on a filesystem without reflink "
                    "(FICLONE). Put the pool on XFS formatted with reflink=1 or on btrfs, or "
                    "set loop_image_size (e.g. 20Gi) so Flotilla creates its own "
                    f"loop-mounted XFS image at {self.backing_image}"
                )
            self._mount_backing_image()
        for d in self._dirs.values():
            os.makedirs(d, exist_ok=True)
        self._take_lock()
        self._reconcile()
        self._thaw_all()

    def stop(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.path, ".flotilla.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Unavailable(
                f"pool {self.name!r}: {self.path} is in use by another flotilla process"
            ) from None
        self._lock_fd = fd

    def _mount_backing_image(self) -> None:
        """Create (once) and mount an XFS reflink=1 image at ``path`` (like loop-lvm)."""
        current = self.system.mount_at(self.path)
        if current is not None:
            backing = self.system.loop_backing_file(current.source)
            if backing and backing.removesuffix(" (deleted)") == self.backing_image:
                return
            raise Unavailable(
                f"pool {self.name!r}: {self.path} is a mount of {current.source} "
                f"({current.fstype}) without reflink; unmount it or use another path"
            )
        if os.listdir(self.path):
            raise Unavailable(
                f"pool {self.name!r}: {self.path} is not empty and has no reflink; refusing "
                "to mount a loop image over existing files"
            )
        assert self.loop_image_size is not None
        if not os.path.exists(self.backing_image):
            tmp = self.backing_image + ".tmp"
            with open(tmp, "wb") as f:
                f.truncate(self.loop_image_size)
            self.system.mkfs(tmp, "xfs")
            os.replace(tmp, self.backing_image)
            log.info("pool %s: created %s bytes XFS image %s", self.name,
                     self.loop_image_size, self.backing_image)
        device = self.system.loop_attach(self.backing_image)
        try:
            self.system.mount(device, self.path, "xfs")
        except Exception:
            self.system.loop_detach(device)
            raise
        log.info("pool %s: mounted %s (%s) at %s", self.name, self.backing_image, device,
                 self.path)

    def _reconcile(self) -> None:
        """Rebuild the index from disk; remove what half-finished work left behind."""
        for entry in os.scandir(self._dirs["tmp"]):
            log.info("pool %s: removing leftover %s", self.name, entry.path)
            os.unlink(entry.path)
        volumes: dict[str, Volume] = {}
        snapshots: dict[str, Snapshot] = {}
        for kind in ("volumes", "snapshots"):
            d = self._dirs[kind]
            names = set(os.listdir(d))
            for fname in sorted(names):
                stem, ext = os.path.splitext(fname)
                full = os.path.join(d, fname)
                if ext == ".img" and f"{stem}.json" not in names:
                    log.info("pool %s: removing image without metadata %s", self.name, full)
                    os.unlink(full)
                elif ext == ".json":
                    meta = self._read_meta(full)
                    if meta is None:
                        continue
                    if kind == "volumes":
                        vol = _volume_from(meta)
                        volumes[vol.id] = vol
                    else:
                        snap = _snapshot_from(meta)
                        snapshots[snap.id] = snap
                elif ext not in (".img", ".json"):
                    log.info("pool %s: removing stray file %s", self.name, full)
                    os.unlink(full)
        with self._mutex:
            self._volumes = volumes
            self._snapshots = snapshots
        log.info("pool %s: %d volumes, %d snapshots at %s", self.name, len(volumes),
                 len(snapshots), self.path)

    def _thaw_all(self) -> None:
        """A process killed inside a snapshot leaves the volume's filesystem frozen (the
        kernel does not thaw on exit): thaw every mounted volume of this pool."""
        images = {self.image_path(v.id) for v in self.list_volumes()}
        devices = {d for img in images for d in self.system.loop_devices_for(img)}
        seen = set()
        for m in self.system.mounts():
            if m.source in devices and m.major_minor not in seen:
                seen.add(m.major_minor)
                if self.system.thaw(m.mount_point):
                    log.warning("pool %s: thawed %s, left frozen by an interrupted "
                                "snapshot", self.name, m.mount_point)

    def _read_meta(self, path: str) -> dict[str, Any] | None:
        try:
            with open(path) as f:
                meta: dict[str, Any] = json.load(f)
        except (OSError, ValueError) as err:
            log.error("pool %s: unreadable metadata %s: %s (left in place)", self.name, path,
                      err)
            return None
        if meta.get("version") != FORMAT_VERSION or meta.get("pool") != self.name:
            log.error("pool %s: metadata %s is not of this pool/format (left in place)",
                      self.name, path)
            return None
        return meta

    def check(self) -> None:
        if self._lock_fd is None:
            raise Unavailable(f"pool {self.name!r} is not started")
        for d in self._dirs.values():
            if not os.path.isdir(d):
                raise Unavailable(f"pool {self.name!r}: directory {d} is missing")
        try:
            os.statvfs(self.path)
        except OSError as err:
            raise Unavailable(f"pool {self.name!r}: {self.path}: {err}") from None

    # ---- paths ----------------------------------------------------------------------

    def _uid(self, object_id: str, kind: str) -> str | None:
        parsed = parse_id(object_id)
        if parsed is None or parsed[0] != self.name or parsed[1] != kind:
            return None
        return parsed[2]

    def _file(self, kind: str, object_id: str, ext: str) -> str:
        uid = self._uid(object_id, "vol" if kind == "volumes" else "snap")
        assert uid is not None
        return os.path.join(self._dirs[kind], uid + ext)

    def image_path(self, volume_id: str) -> str:
        return self._file("volumes", volume_id, ".img")

    def _commit(self, kind: str, object_id: str, tmp_img: str, meta: dict[str, Any]) -> None:
        """Move a built image into place, then its metadata: the object now exists."""
        tmp_meta = tmp_img.removesuffix(".img") + ".json"
        self.system.write_atomic(tmp_meta, json.dumps(meta, sort_keys=True).encode())
        crashpoint(f"filepool.{kind}.meta-written")
        os.rename(tmp_img, self._file(kind, object_id, ".img"))
        crashpoint(f"filepool.{kind}.image-in-place")
        os.rename(tmp_meta, self._file(kind, object_id, ".json"))
        self.system.fsync_dir(self._dirs[kind])
        crashpoint(f"filepool.{kind}.committed")

    def _remove(self, kind: str, object_id: str) -> None:
        """Metadata first (the object is gone), then the image."""
        for ext in (".json", ".img"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(kind, object_id, ext))
            self.system.fsync_dir(self._dirs[kind])
            crashpoint(f"filepool.{kind}.removed{ext}")

    # ---- capacity -------------------------------------------------------------------

    def _fs_usage(self) -> tuple[int, int]:
        st = os.statvfs(self.path)
        size = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return size, used

    def _limit_check(self, extra: int) -> str | None:
        """Why ``extra`` more provisioned bytes would break a limit (None if it fits)."""
        size, used = self._fs_usage()
        used_pct = 100.0 * used / size if size else 100.0
        if used_pct >= self.max_used_percent:
            return (f"pool {self.name!r} is {used_pct:.1f}% physically used, at or over "
                    f"max_used_percent={self.max_used_percent:g}")
        provisioned = sum(v.size for v in self._volumes.values()) + self._reserved
        allowed = int(size * self.overprovision_ratio)
        if provisioned + extra > allowed:
            return (f"pool {self.name!r}: provisioning {extra} more bytes would make "
                    f"{provisioned + extra} provisioned, over overprovision_ratio="
                    f"{self.overprovision_ratio:g} x {size} bytes = {allowed} bytes")
        return None

    @contextlib.contextmanager
    def _reserve(self, extra: int) -> Iterator[None]:
        with self._mutex:
            reason = self._limit_check(extra)
            if reason:
                raise ResourceExhausted(reason)
            self._reserved += extra
        try:
            yield
        finally:
            with self._mutex:
                self._reserved -= extra

    def capacity(self) -> Capacity:
        size, used = self._fs_usage()
        with self._mutex:
            provisioned = sum(v.size for v in self._volumes.values())
            nvol, nsnap = len(self._volumes), len(self._snapshots)
            refusing = self._limit_check(0) is not None
            reserved = self._reserved
        headroom = int(size * self.overprovision_ratio) - provisioned - reserved
        available = 0 if refusing else max(0, headroom)
        return Capacity(size=size, used=used, provisioned=provisioned, available=available,
                        volumes=nvol, snapshots=nsnap)

    # ---- volumes --------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        with self._mutex:
            return self._volumes.get(volume_id)

    def find_volume(self, name: str) -> Volume | None:
        with self._mutex:
            return next((v for v in self._volumes.values() if v.name == name), None)

    def list_volumes(self) -> list[Volume]:
        with self._mutex:
            return list(self._volumes.values())

    def create_volume(self, req: VolumeRequest) -> Volume:
        existing = self.find_volume(req.name)
        if existing is not None:
            check_compatible(existing, req)
            return existing
        source_img = self._source_image(req)
        volume = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                        size=req.size, fs_type=req.fs_type, source=req.source,
                        parameters=dict(req.parameters))
        tmp_img = os.path.join(self._dirs["tmp"], self._uid(volume.id, "vol") + ".img")  # type: ignore[operator]
        with self._reserve(req.size):
            try:
                if source_img is None:
                    with open(tmp_img, "wb") as f:
                        f.truncate(req.size)
                else:
                    with self._quiesced(source_img):
                        self.system.reflink(source_img, tmp_img)
                    crashpoint("filepool.create.cloned")
                    os.truncate(tmp_img, req.size)
                    os.chmod(tmp_img, 0o600)
                self._commit("volumes", volume.id, tmp_img, _meta_of(volume))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_img)
                raise
            with self._mutex:
                self._volumes[volume.id] = volume
        log.info("pool %s: created volume %s (%s) %d bytes%s", self.name, volume.id,
                 volume.name, volume.size, f" from {req.source}" if req.source else "")
        return volume

    def _source_image(self, req: VolumeRequest) -> str | None:
        if req.source is None:
            return None
        if req.source.kind == "snapshot":
            snap = self.get_snapshot(req.source.id)
            if snap is None:
                raise NotFound(f"source snapshot {req.source.id} does not exist in pool "
                               f"{self.name!r}")
            size, path = snap.size, self._file("snapshots", snap.id, ".img")
        else:
            vol = self.get_volume(req.source.id)
            if vol is None:
                raise NotFound(f"source volume {req.source.id} does not exist in pool "
                               f"{self.name!r}")
            size, path = vol.size, self.image_path(vol.id)
        if req.size < size:
            raise OutOfRange(
                f"requested {req.size} bytes is smaller than the source's {size} bytes; "
                "a volume can only be restored or cloned at the same size or larger"
            )
        return path

    def delete_volume(self, volume_id: str) -> None:
        if self.get_volume(volume_id) is None:
            if self._uid(volume_id, "vol") is not None:
                self._remove("volumes", volume_id)  # finish a half-done delete
            return
        attached = self.system.loop_devices_for(self.image_path(volume_id))
        if attached:
            raise FailedPrecondition(
                f"volume {volume_id} is still attached as {', '.join(attached)} on this "
                "node; unpublish and unstage it first"
            )
        self._remove("volumes", volume_id)
        with self._mutex:
            self._volumes.pop(volume_id, None)
        log.info("pool %s: deleted volume %s", self.name, volume_id)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        img = self.image_path(volume_id)
        if size <= vol.size:
            if os.path.getsize(img) < vol.size:  # finish a half-done expansion
                os.truncate(img, vol.size)
            return vol
        with self._reserve(size - vol.size):
            os.truncate(img, size)
            crashpoint("filepool.expand.truncated")
            grown = Volume(**{**vol.__dict__, "size": size})
            self.system.write_atomic(self._file("volumes", volume_id, ".json"),
                                     json.dumps(_meta_of(grown), sort_keys=True).encode())
            with self._mutex:
                self._volumes[volume_id] = grown
        log.info("pool %s: expanded volume %s to %d bytes", self.name, volume_id, size)
        return grown

    def volume_condition(self, volume_id: str) -> Condition:
        vol = self.get_volume(volume_id)
        if vol is None:
            return Condition(True, "volume metadata is missing")
        try:
            actual = os.path.getsize(self.image_path(volume_id))
        except OSError as err:
            return Condition(True, f"backing image unreadable: {err.strerror}")
        if actual < vol.size:
            return Condition(True, f"backing image is {actual} bytes, expected {vol.size}")
        return Condition(False, "volume is healthy")

    # ---- snapshots ------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        with self._mutex:
            return self._snapshots.get(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        with self._mutex:
            return next((s for s in self._snapshots.values() if s.name == name), None)

    def list_snapshots(self) -> list[Snapshot]:
        with self._mutex:
            return list(self._snapshots.values())

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: dict[str, str]
    ) -> Snapshot:
        existing = self.find_snapshot(name)
        if existing is not None:
            if existing.source_volume_id != source_volume_id:
                raise AlreadyExists(
                    f"snapshot {name!r} exists for volume {existing.source_volume_id}, "
                    f"not {source_volume_id}"
                )
            return existing
        vol = self.get_volume(source_volume_id)
        if vol is None:
            raise NotFound(f"source volume {source_volume_id} does not exist")
        with self._mutex:
            reason = self._limit_check(0)
        if reason:
            raise ResourceExhausted(reason)
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size, parameters=dict(parameters))
        tmp_img = os.path.join(self._dirs["tmp"], self._uid(snap.id, "snap") + ".img")  # type: ignore[operator]
        try:
            with self._quiesced(self.image_path(vol.id)):
                crashpoint("filepool.snapshot.frozen")
                self.system.reflink(self.image_path(vol.id), tmp_img, mode=0o400)
            self._commit("snapshots", snap.id, tmp_img, _meta_of(snap))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_img)
            raise
        with self._mutex:
            self._snapshots[snap.id] = snap
        log.info("pool %s: snapshot %s (%s) of %s", self.name, snap.id, name, vol.id)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        if self._uid(snapshot_id, "snap") is None:
            return
        self._remove("snapshots", snapshot_id)
        with self._mutex:
            self._snapshots.pop(snapshot_id, None)

    @contextlib.contextmanager
    def _quiesced(self, image: str) -> Iterator[None]:
        """Make the image crash-consistent while the body runs.

        A mounted filesystem is frozen (flushed, writes blocked) around the body; a raw
        attached device has its page cache written back first.
        """
        devices = self.system.loop_devices_for(image)
        mount_points = [m.mount_point for m in self.system.mounts() if m.source in devices]
        if mount_points:
            with self.system.frozen(mount_points[0]):
                yield
            return
        for dev in devices:
            self.system.flush_device(dev)
        yield

    # ---- node side ------------------------------------------------------------------

    def _existing_image(self, volume_id: str) -> str:
        if self.get_volume(volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist in pool {self.name!r}")
        img = self.image_path(volume_id)
        if not os.path.exists(img):
            raise NotFound(f"backing image of volume {volume_id} is missing: {img}")
        return img

    def attach(self, volume_id: str) -> str:
        return self.system.loop_attach(self._existing_image(volume_id))

    def detach(self, volume_id: str) -> None:
        if self._uid(volume_id, "vol") is None:
            return
        for dev in self.system.loop_devices_for(self.image_path(volume_id)):
            self.system.loop_detach(dev)

    def refresh_device(self, volume_id: str) -> int:
        img = self._existing_image(volume_id)
        size = os.path.getsize(img)
        for dev in self.system.loop_devices_for(img):
            self.system.loop_refresh(dev)
            size = self.system.device_size(dev)
        return size

    def device_of(self, volume_id: str) -> str | None:
        """The attached loop device of a volume, if any."""
        if self._uid(volume_id, "vol") is None:
            return None
        devices = self.system.loop_devices_for(self.image_path(volume_id))
        return devices[0] if devices else None


def _meta_of(obj: Volume | Snapshot) -> dict[str, Any]:
    meta = asdict(obj)
    meta["version"] = FORMAT_VERSION
    meta["kind"] = "volume" if isinstance(obj, Volume) else "snapshot"
    return meta


def _volume_from(meta: dict[str, Any]) -> Volume:
    src = meta.get("source")
    return Volume(
        id=meta["id"], name=meta["name"], pool=meta["pool"], size=int(meta["size"]),
        fs_type=meta.get("fs_type", ""),
        source=Source(src["kind"], src["id"]) if src else None,
        parameters=dict(meta.get("parameters", {})), created=float(meta["created"]),
    )


def _snapshot_from(meta: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=meta["id"], name=meta["name"], pool=meta["pool"],
        source_volume_id=meta["source_volume_id"], size=int(meta["size"]),
        created=float(meta["created"]), parameters=dict(meta.get("parameters", {})),
    )

