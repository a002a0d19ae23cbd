"""Fakes shared by the root-free unit tests: an in-memory pool (:class:`MemoryPool`)."""

from __future__ import annotations

import threading

from csi.errors import NotFound
from csi.pools.base import (
    Capacity,
    Condition,
    Pool,
    Snapshot,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
)

GiB = 1 << 30


class MemoryPool(Pool):
    """A node-local pool in memory; ``fail_create`` injects an error."""

    type = "memory"

    def __init__(self, name: str = "local", size: int = 100 * GiB) -> None:
        super().__init__(name, {"name": name, "type": "memory"})
        self.size = size
        self.volumes: dict[str, Volume] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.fail_create: Exception | None = None
        self.lock = threading.Lock()

    def start(self) -> None: ...

    def check(self) -> None: ...

    def create_volume(self, req: VolumeRequest) -> Volume:
        if self.fail_create is not None:
            raise self.fail_create
        with self.lock:
            found = self.find_volume(req.name)
            if found:
                check_compatible(found, req)
                return found
            if req.source and req.source.kind == "snapshot" and \
                    req.source.id not in self.snapshots:
                raise NotFound(req.source.id)
            vol = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                         size=req.size, fs_type=req.fs_type, source=req.source,
                         parameters=dict(req.parameters))
            self.volumes[vol.id] = vol
            return vol

    def delete_volume(self, volume_id: str) -> None:
        self.volumes.pop(volume_id, None)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        vol = self.volumes[volume_id]
        vol.size = max(vol.size, size)
        return vol

    def get_volume(self, volume_id: str) -> Volume | None:
        return self.volumes.get(volume_id)

    def find_volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes.values() if v.name == name), None)

    def list_volumes(self) -> list[Volume]:
        return list(self.volumes.values())

    def volume_condition(self, volume_id: str) -> Condition:
        return Condition(False, "ok")

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        found = self.find_snapshot(name)
        if found:
            return found
        vol = self.volumes[source_volume_id]
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size)
        self.snapshots[snap.id] = snap
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.pop(snapshot_id, None)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.snapshots.get(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return next((s for s in self.snapshots.values() if s.name == name), None)

    def list_snapshots(self) -> list[Snapshot]:
        return list(self.snapshots.values())

    def capacity(self) -> Capacity:
        used = sum(v.size for v in self.volumes.values())
        return Capacity(size=self.size, used=used, provisioned=used,
                        available=self.size - used, volumes=len(self.volumes),
                        snapshots=len(self.snapshots))

    def attach(self, volume_id: str) -> str:
        return "/dev/null"

    def detach(self, volume_id: str) -> None: ...

    def device_of(self, volume_id: str) -> str | None:
        return None

    def refresh_device(self, volume_id: str) -> int:
        return self.volumes[volume_id].size
