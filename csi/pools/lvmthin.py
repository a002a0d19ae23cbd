"""``lvmthin``: thin logical volumes in an LVM2 thin pool (device-mapper dm-thin).

Options::

    volume_group          the VG that holds the thin pool (required)
    thin_pool             the thin-pool LV in that VG (required)
    overprovision_ratio   refuse when provisioned bytes would pass ratio x pool data size
    max_data_percent      refuse when the pool's data space is this full (Data%)
    max_metadata_percent  refuse when the pool's metadata space is this full (Meta%)
    default_volume_size   size of a volume whose request leaves it open
    discard               mount filesystems with -o discard (freed blocks go back)

Objects are LVs in the VG, bound to the thin pool::

    fl-<pool>-vol-<uid>    a volume: a thin LV (or a thin snapshot made writable, for
                           clones and restores); active only while attached
    fl-<pool>-snap-<uid>   a snapshot: a thin snapshot of the volume, with the activation
                           skip flag set, so it is never activated unless asked for

The CSI name, size, filesystem, parameters and content source of each object are LV
tags (``fl.name=...``), written by the same ``lvcreate`` that makes the LV, so LVM
metadata is the only state and an object exists exactly when its LV does. The one
two-step change is a size change (restore into a larger volume, expansion): the size tag
is written first, then ``lvextend``; :meth:`LvmThinPool.start` (and attach) finish an
``lvextend`` a crash left undone. Thin snapshots are independent of their origin, so a
volume can be deleted while its snapshots live, and the other way round.

The LVM commands and reports are :class:`csi.pools.lvm.ThinPoolLvm`'s; every ``lvm``
command runs through :meth:`csi.system.System.lvm` with a timeout and with udev
synchronisation off, which works inside a node container (no udev) and inside the test VM
alike.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import replace

from csi.errors import (
    CommandFailed,
    FailedPrecondition,
    FlotillaError,
    InvalidArgument,
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
    Source,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
    parse_id,
)
from csi.pools.index import Fill, ObjectIndex, ThinBudget
from csi.pools.lvm import LV, TAG_PREFIX, PoolStatus, ThinPoolLvm, tag_args
from csi.system import System

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
LVM_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
#: where the pool's own lock file goes by default: LVM's locking_dir, which a node
#: container mounts from the host (docs/lvmthin.md, "Deployment")
LOCK_DIR = "/run/lock/lvm"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


class LvmThinPool(Pool):
    type = "lvmthin"
    backups = True

    def __init__(self, name: str, options: dict[str, object], system: System) -> None:
        super().__init__(name, options)
        self.system = system
        opts = Options(name, options)
        self.vg = opts.text("volume_group")
        self.thin_pool = opts.text("thin_pool")
        self.overprovision_ratio = opts.number("overprovision_ratio", 10.0, 0.01, 1000.0)
        self.max_data_percent = opts.number("max_data_percent", 90.0, 1.0, 100.0)
        self.max_metadata_percent = opts.number("max_metadata_percent", 80.0, 1.0, 100.0)
        self.default_size = opts.size("default_volume_size", 1 << 30) or (1 << 30)
        # online discard unmaps freed blocks of the thin LV: deleted data goes back
        self.mount_options = ("discard",) if opts.flag("discard", True) else ()
        #: directory of the one-process-per-thin-pool lock file (created if missing)
        self.lock_dir = os.path.abspath(opts.text("lock_dir", LOCK_DIR))
        opts.finish()
        for key, value in (("volume_group", self.vg), ("thin_pool", self.thin_pool)):
            if not LVM_NAME_RE.match(value):
                raise InvalidArgument(
                    f"pool {name!r}: option {key}={value!r} is not an LVM name (letters, "
                    "digits, '+', '_', '.', '-'; not starting with '-'; at most 127)"
                )
        self._lv_re = re.compile(rf"^fl-{re.escape(name)}-(vol|snap)-([0-9a-f]{{32}})$")
        self.index = ObjectIndex()
        self.budget = ThinBudget(self.index, f"pool {name!r} (thin pool {self.vg}/"
                                 f"{self.thin_pool})", self.overprovision_ratio)
        self._lock_fd: int | None = None
        self.lvm = ThinPoolLvm(system, name, self.vg, self.thin_pool)
        #: volumes whose LV may be smaller than their size tag (an interrupted growth)
        self._short: set[str] = set()

    # ---- naming ---------------------------------------------------------------------

    def lv_name(self, object_id: str) -> str | None:
        """The LV of a volume or snapshot id of this pool (None when not ours)."""
        parsed = parse_id(object_id)
        if parsed is None or parsed[0] != self.name:
            return None
        return f"fl-{self.name}-{parsed[1]}-{parsed[2]}"

    def _lv(self, object_id: str) -> str:
        name = self.lv_name(object_id)
        if name is None:
            raise NotFound(f"{object_id} is not an object of pool {self.name!r}")
        return name

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self.granularity = self.lvm.extent_size()
        pool = self.lvm.find(self.thin_pool)
        if pool is None or not pool.attr.startswith("t"):
            raise Unavailable(
                f"pool {self.name!r}: {self.vg}/{self.thin_pool} is not a thin pool; create "
                f"it with: lvcreate --type thin-pool -L <size> -n {self.thin_pool} {self.vg}"
            )
        if not pool.active:
            self.lvm.run("lvchange", "--activate", "y", self.lvm.path(self.thin_pool))
        self._take_lock()
        try:
            self._reconcile()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._lock_fd is not None:
            self.system.unlock(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        """One flotilla process per thin pool: its in-memory index must be the only one."""
        path = os.path.join(self.lock_dir,
                            f"flotilla-lvmthin-{self.vg}-{self.thin_pool}.lock")
        try:
            os.makedirs(self.lock_dir, exist_ok=True)
            fd = self.system.try_lock(path)
        except OSError as err:
            raise Unavailable(f"pool {self.name!r}: cannot create the lock file {path} "
                              f"({err.strerror}); mount a writable directory at lock_dir "
                              f"{self.lock_dir} (the host's /run/lock/lvm) or set the pool "
                              "option lock_dir") from None
        if fd is None:
            raise Unavailable(f"pool {self.name!r}: thin pool {self.vg}/{self.thin_pool} is "
                              "in use by another flotilla process")
        self._lock_fd = fd

    def _reconcile(self) -> None:
        """Rebuild the index from LV tags; finish size changes a crash interrupted."""
        volumes: dict[str, Volume] = {}
        snapshots: list[Snapshot] = []
        for lv in self.lvm.report(fresh=False):
            m = self._lv_re.match(lv.name)
            if m is None:
                continue
            if lv.pool_lv != self.thin_pool:
                log.error("pool %s: LV %s/%s is not in thin pool %s (left in place)",
                          self.name, self.vg, lv.name, self.thin_pool)
                continue
            if lv.suspended:
                log.warning("pool %s: resuming %s, left suspended by an interrupted "
                            "command", self.name, lv.name)
                self.lvm.resume(lv.name)
            kind, uid = m.groups()
            object_id = f"{self.name}:{kind}-{uid}"
            try:
                if kind == "vol":
                    vol = self._volume_from(object_id, lv)
                    volumes[vol.id] = vol
                    if lv.size < vol.size:
                        self._short.add(vol.id)
                else:
                    snapshots.append(self._snapshot_from(object_id, lv))
            except (KeyError, ValueError, binascii.Error, UnicodeDecodeError) as err:
                log.error("pool %s: LV %s/%s has unreadable tags (%s); left in place",
                          self.name, self.vg, lv.name, err)
        self.index.replace_all(list(volumes.values()), snapshots)
        for vol in volumes.values():
            if vol.id in self._short:
                log.info("pool %s: finishing the growth of %s to %d bytes", self.name,
                         vol.id, vol.size)
                try:
                    self._finish_growth(vol)
                except FlotillaError as err:
                    log.error("pool %s: growing %s failed (retried at attach): %s",
                              self.name, vol.id, err)
        log.info("pool %s: %d volumes, %d snapshots in %s/%s", self.name, len(volumes),
                 len(snapshots), self.vg, self.thin_pool)

    def check(self) -> None:
        if self._lock_fd is None:
            raise Unavailable(f"pool {self.name!r} is not started")
        status = self.lvm.status()
        if status.health in ("failed", "out_of_data", "metadata_read_only"):
            raise Unavailable(f"pool {self.name!r}: thin pool {self.vg}/{self.thin_pool} "
                              f"is {status.health}; see docs/lvmthin.md (recovery)")

    # ---- tags -----------------------------------------------------------------------

    def _tags(self, obj: Volume | Snapshot) -> list[str]:
        tags = {"v": FORMAT_VERSION, "name": _b64(obj.name), "size": str(obj.size),
                "created": repr(obj.created)}
        if obj.parameters:
            tags["params"] = _b64(json.dumps(obj.parameters, sort_keys=True))
        if isinstance(obj, Volume):
            if obj.fs_type:
                tags["fs"] = obj.fs_type
            if obj.source is not None:
                tags["src" + ("snap" if obj.source.kind == "snapshot" else "vol")] = \
                    obj.source.id
        else:
            tags["srcvol"] = obj.source_volume_id
        return tag_args(tags)

    def _volume_from(self, object_id: str, lv: LV) -> Volume:
        t = lv.tags
        if t["v"] != FORMAT_VERSION:
            raise ValueError(f"format version {t['v']}")
        source = None
        if "srcsnap" in t:
            source = Source("snapshot", t["srcsnap"])
        elif "srcvol" in t:
            source = Source("volume", t["srcvol"])
        return Volume(id=object_id, name=_unb64(t["name"]), pool=self.name,
                      size=int(t["size"]), fs_type=t.get("fs", ""), source=source,
                      parameters=json.loads(_unb64(t["params"])) if "params" in t else {},
                      created=float(t["created"]))

    def _snapshot_from(self, object_id: str, lv: LV) -> Snapshot:
        t = lv.tags
        if t["v"] != FORMAT_VERSION:
            raise ValueError(f"format version {t['v']}")
        return Snapshot(id=object_id, name=_unb64(t["name"]), pool=self.name,
                        source_volume_id=t["srcvol"], size=int(t["size"]),
                        created=float(t["created"]),
                        parameters=json.loads(_unb64(t["params"])) if "params" in t else {})

    # ---- capacity -------------------------------------------------------------------

    def _fills(self, status: PoolStatus) -> list[Fill]:
        return [
            Fill("data space", status.data_percent, "max_data_percent", self.max_data_percent),
            Fill("metadata space", status.metadata_percent, "max_metadata_percent",
                 self.max_metadata_percent)]

    def _reserve(self, extra: int) -> contextlib.AbstractContextManager[None]:
        # the thin pool's virtual data size is what overprovision_ratio multiplies
        status = self.lvm.status()
        return self.budget.reserve(status.size, self._fills(status), extra)

    def capacity(self) -> Capacity:
        status = self.lvm.status()
        b = self.budget.state(status.size, self._fills(status), self.granularity)
        provisioned = b.provisioned
        return Capacity(
            size=status.physical, used=status.used, provisioned=provisioned,
            available=b.available, volumes=b.volumes, snapshots=b.snapshots,
            extra={
                "flotilla_thinpool_data_percent": status.data_percent,
                "flotilla_thinpool_metadata_percent": status.metadata_percent,
                "flotilla_thinpool_overprovision_ratio":
                    provisioned / status.size if status.size else 0.0,
            },
        )

    def _round(self, size: int) -> int:
        return -(-size // self.granularity) * self.granularity

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
            self._finish_growth(existing)
            return existing
        source = self.source_of(req)
        source_lv = None if source is None else self._lv(source.id)
        source_size = 0 if source is None else source.size
        volume = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                        size=req.size, fs_type=req.fs_type, source=req.source,
                        parameters=dict(req.parameters))
        lv = self._lv(volume.id)
        with self._reserve(req.size):
            if source_lv is None:
                self.lvm.run("lvcreate", "--type", "thin", "--virtualsize", f"{req.size}b",
                             "--thinpool", self.thin_pool, "--name", lv, "--activate", "n",
                             *self._tags(volume), self.vg)
            else:
                # a writable thin snapshot of the source; the size tag says what it will be
                self.lvm.run("lvcreate", "--snapshot", "--setactivationskip", "n",
                             "--activate", "n", "--name", lv, *self._tags(volume),
                             self.lvm.path(source_lv))
                if req.size > source_size:
                    self._short.add(volume.id)
                    crashpoint("lvmthin.create.snapshotted")
                    self.lvm.grow(lv, req.size)
                    self._short.discard(volume.id)
            self.index.put(volume)
        log.info("pool %s: created volume %s (%s) %d bytes%s", self.name, volume.id,
                 volume.name, volume.size, f" from {req.source}" if req.source else "")
        return volume

    def _finish_growth(self, vol: Volume) -> None:
        """Grow the LV to its size tag when a growth was interrupted (a crash, a failed
        ``lvextend``): the size tag is the intent, written first."""
        if vol.id in self._short:
            self.lvm.grow(self._lv(vol.id), vol.size)
            self._short.discard(vol.id)

    def delete_volume(self, volume_id: str) -> None:
        vol = self.get_volume(volume_id)
        if vol is None:
            return
        self.lvm.remove(self._lv(volume_id))
        self.index.drop(volume_id)
        log.info("pool %s: deleted volume %s", self.name, volume_id)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if size <= vol.size:
            self._finish_growth(vol)
            return vol
        lv = self._lv(volume_id)
        with self._reserve(size - vol.size):
            grown = replace(vol, size=size)
            # intent first (the size tag), then the lvextend: a crash in between is
            # finished by start() or the next attach
            self.lvm.run("lvchange", "--deltag", f"{TAG_PREFIX}size={vol.size}",
                         "--addtag", f"{TAG_PREFIX}size={size}", self.lvm.path(lv))
            self.index.put(grown)
            self._short.add(volume_id)
            crashpoint("lvmthin.expand.tagged")
            self.lvm.grow(lv, size)
            self._short.discard(volume_id)
        log.info("pool %s: expanded volume %s to %d bytes", self.name, volume_id, size)
        return grown

    def volume_condition(self, volume_id: str) -> Condition:
        vol = self.get_volume(volume_id)
        if vol is None:
            return Condition(True, "volume is not in the pool's index")
        try:
            lvs = self.lvm.report(fresh=False)
        except Unavailable as err:
            return Condition(True, str(err))
        lv = next((x for x in lvs if x.name == self._lv(volume_id)), None)
        if lv is None:
            return Condition(True, f"LV {self.vg}/{self._lv(volume_id)} is missing")
        pool = next((x for x in lvs if x.name == self.thin_pool), None)
        if pool is not None and pool.health:
            return Condition(True, f"thin pool {self.vg}/{self.thin_pool} is {pool.health}")
        if lv.health:
            return Condition(True, f"LV {self.vg}/{lv.name} is {lv.health}")
        if lv.size < vol.size:
            return Condition(True, f"LV is {lv.size} bytes, expected {vol.size}")
        return Condition(False, "volume is healthy")

    # ---- snapshots ------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.index.snapshot(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return self.index.snapshot_named(name)

    def list_snapshots(self) -> list[Snapshot]:
        return self.index.snapshots()

    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: dict[str, str]
    ) -> Snapshot:
        found = self.snapshot_request(name, source_volume_id)
        if isinstance(found, Snapshot):
            return found
        vol = found
        status = self.lvm.status()
        self.budget.refuse(status.size, self._fills(status))
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size, parameters=dict(parameters))
        # a thin snapshot: LVM suspends an active origin with its filesystem frozen
        # (crash-consistent); the activation skip flag keeps the snapshot inactive
        self.lvm.run("lvcreate", "--snapshot", "--setactivationskip", "y", "--activate", "n",
                     "--name", self._lv(snap.id), *self._tags(snap),
                     self.lvm.path(self._lv(vol.id)))
        self.index.put(snap)
        log.info("pool %s: snapshot %s (%s) of %s", self.name, snap.id, name, vol.id)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        lv = self.lv_name(snapshot_id)
        if lv is None or self.get_snapshot(snapshot_id) is None:
            return
        self.lvm.remove(lv)
        self.index.drop(snapshot_id)
        log.info("pool %s: deleted snapshot %s", self.name, snapshot_id)

    @contextlib.contextmanager
    def read_snapshot(self, snapshot_id: str) -> Iterator[str]:
        """The snapshot's thin LV, activated for the time of the ``with`` unless it was
        active already (snapshots skip activation)."""
        if self.get_snapshot(snapshot_id) is None:
            raise NotFound(f"snapshot {snapshot_id} does not exist in pool {self.name!r}")
        lv = self._lv(snapshot_id)
        device = self.lvm.device(lv)
        activated = device is None
        try:
            yield device if device is not None else self.lvm.activate(lv)
        finally:
            if activated:
                self.lvm.deactivate(lv)

    # ---- node side ------------------------------------------------------------------

    def attach(self, volume_id: str) -> str:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist in pool {self.name!r}")
        lv = self._lv(volume_id)
        device = self.lvm.device(lv)
        if device is not None:
            return device
        self._finish_growth(vol)
        return self.lvm.activate(lv)

    def detach(self, volume_id: str) -> None:
        lv = self.lv_name(volume_id)
        if lv is None or self.lvm.device(lv) is None:
            return
        try:
            self.lvm.deactivate(lv)
        except CommandFailed as err:
            if "in use" in err.stderr or "open" in err.stderr:
                raise FailedPrecondition(
                    f"volume {volume_id} is still in use on this node; unmount it first"
                ) from None
            raise

    def device_of(self, volume_id: str) -> str | None:
        lv = self.lv_name(volume_id)
        return None if lv is None else self.lvm.device(lv)

    def refresh_device(self, volume_id: str) -> int:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist in pool {self.name!r}")
        self._finish_growth(vol)
        device = self.device_of(volume_id)
        if device is not None:
            return self.system.device_size(device)
        found = self.lvm.find(self._lv(volume_id))
        return found.size if found is not None else vol.size
