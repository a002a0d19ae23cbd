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
import logging
import os
from collections.abc import Iterator

from csi.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from csi.faults import crashpoint
from csi.pools.base import (
    Capacity,
    Condition,
    Options,
    Pool,
    Snapshot,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
)
from csi.pools.index import Fill, ThinBudget, filesystem_usage
from csi.pools.store import ObjectStore
from csi.system import System

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class FilePool(Pool):
    type = "filepool"
    backups = True

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
        self._lock_fd: int | None = None
        self._dirs = {k: os.path.join(self.path, k) for k in ("volumes", "snapshots", "tmp")}
        self.store = ObjectStore(name, system, self._dirs, ".img", "filepool")
        self.index = self.store.index
        self.budget = ThinBudget(self.index, f"pool {name!r}", self.overprovision_ratio)

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
        self.store.make_dirs()
        self._take_lock()
        self.store.load()
        self._thaw_all()

    def stop(self) -> None:
        if self._lock_fd is not None:
            self.system.unlock(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        fd = self.system.try_lock(os.path.join(self.path, ".flotilla.lock"))
        if fd is None:
            raise Unavailable(
                f"pool {self.name!r}: {self.path} is in use by another flotilla process")
        self._lock_fd = fd

    def _mount_backing_image(self) -> None:
        """Create (once) and mount an XFS reflink=1 image at ``path`` (like loop-lvm)."""
        current = self.system.mount_at(self.path)
        if current is not None:
            if self.system.loop_backed_by(current.source, self.backing_image):
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

    def image_path(self, volume_id: str) -> str:
        return self.store.path("volumes", volume_id)

    # ---- capacity -------------------------------------------------------------------

    def _usage(self) -> tuple[int, int, list[Fill]]:
        """Physical size and use of the pool's filesystem, and its fill level."""
        return filesystem_usage(os.statvfs(self.path), self.max_used_percent)

    def _reserve(self, extra: int) -> contextlib.AbstractContextManager[None]:
        size, _, fills = self._usage()
        return self.budget.reserve(size, fills, extra)

    def capacity(self) -> Capacity:
        size, used, fills = self._usage()
        b = self.budget.state(size, fills)
        return Capacity(size=size, used=used, provisioned=b.provisioned, available=b.available,
                        volumes=b.volumes, snapshots=b.snapshots)

    # ---- volumes --------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        return self.index.volume(volume_id)

    def find_volume(self, name: str) -> Volume | None:
        return self.index.volume_named(name)

    def list_volumes(self) -> list[Volume]:
        return self.index.volumes()

    def create_volume(self, req: VolumeRequest) -> Volume:
        existing = self.find_volume(req.name)
        if existing is not None:
            check_compatible(existing, req)
            return existing
        source = self.source_of(req)
        source_img = None if source is None else self.store.payload(source)
        volume = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                        size=req.size, fs_type=req.fs_type, source=req.source,
                        parameters=dict(req.parameters))

        def make(tmp_img: str) -> None:
            if source_img is None:
                with open(tmp_img, "wb") as f:
                    f.truncate(req.size)
                return
            with self._quiesced(source_img):
                self.system.reflink(source_img, tmp_img)
            crashpoint("filepool.create.cloned")
            os.truncate(tmp_img, req.size)
            os.chmod(tmp_img, 0o600)

        with self._reserve(req.size):
            self.store.build(volume, make)
        log.info("pool %s: created volume %s (%s) %d bytes%s", self.name, volume.id,
                 volume.name, volume.size, f" from {req.source}" if req.source else "")
        return volume

    def delete_volume(self, volume_id: str) -> None:
        if self.get_volume(volume_id) is None:
            self.store.remove("volumes", volume_id)  # finish a half-done delete
            return
        image = self.image_path(volume_id)
        attached = self.system.loop_devices_for(image, include_detaching=False)
        if attached:
            raise FailedPrecondition(
                f"volume {volume_id} is still attached as {', '.join(attached)} on this "
                "node; unpublish and unstage it first"
            )
        if self.system.loop_devices_for(image):
            raise Aborted(f"volume {volume_id}: the detach of its loop device is still "
                          "pending (the device is held open elsewhere); retry shortly")
        self.store.remove("volumes", volume_id)
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
            grown = self.store.update(vol, size=size)
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
        return self.index.snapshot(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return self.index.snapshot_named(name)

    def list_snapshots(self) -> list[Snapshot]:
        return self.index.snapshots()

    @contextlib.contextmanager
    def read_snapshot(self, snapshot_id: str) -> Iterator[str]:
        if self.get_snapshot(snapshot_id) is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist in pool {self.name!r}")
        yield self.store.path("snapshots", snapshot_id)

    @contextlib.contextmanager
    def write_volume(self, volume_id: str) -> Iterator[str]:
        """The volume's sparse image itself: no loop device needed."""
        yield self._existing_image(volume_id)

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: dict[str, str]
    ) -> Snapshot:
        found = self.snapshot_request(name, source_volume_id)
        if isinstance(found, Snapshot):
            return found
        vol = found
        size, _, fills = self._usage()
        self.budget.refuse(size, fills)
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size, parameters=dict(parameters))
        origin = self.image_path(vol.id)

        def make(tmp_img: str) -> None:
            with self._quiesced(origin):
                crashpoint("filepool.snapshot.frozen")
                self.system.reflink(origin, tmp_img, mode=0o400)

        self.store.build(snap, make)
        log.info("pool %s: snapshot %s (%s) of %s", self.name, snap.id, name, vol.id)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.store.remove("snapshots", snapshot_id)

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
        if self.store.uid(volume_id, "vol") is None:
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
        if self.store.uid(volume_id, "vol") is None:
            return None
        devices = self.system.loop_devices_for(self.image_path(volume_id))
        return devices[0] if devices else None

