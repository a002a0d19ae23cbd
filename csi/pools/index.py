"""What every pool type keeps in memory about its objects, written once.

:class:`ObjectIndex` is the index of one pool's volumes and snapshots, rebuilt from the
pool's storage when it starts (metadata files for ``filepool`` and ``nfs``, LV tags for
``lvmthin``). :class:`ThinBudget` is the overprovision budget on top of it: a call that adds
provisioned bytes *reserves* them under the index's mutex before it builds anything, so
two concurrent creates cannot both pass ``overprovision_ratio``. Both are pure: the pool
measures its physical fill levels and passes them in as :class:`Fill` values.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from csi.errors import ResourceExhausted
from csi.pools.base import Snapshot, Volume


class ObjectIndex:
    """Volumes and snapshots by id, found by name; every method takes :attr:`mutex`
    except those that say it must be held."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self._volumes: dict[str, Volume] = {}
        self._snapshots: dict[str, Snapshot] = {}

    def replace_all(self, volumes: Sequence[Volume], snapshots: Sequence[Snapshot]) -> None:
        with self.mutex:
            self._volumes = {v.id: v for v in volumes}
            self._snapshots = {s.id: s for s in snapshots}

    def put(self, obj: Volume | Snapshot) -> None:
        with self.mutex:
            if isinstance(obj, Volume):
                self._volumes[obj.id] = obj
            else:
                self._snapshots[obj.id] = obj

    def drop(self, object_id: str) -> None:
        with self.mutex:
            self._volumes.pop(object_id, None)
            self._snapshots.pop(object_id, None)

    def volume(self, volume_id: str) -> Volume | None:
        with self.mutex:
            return self._volumes.get(volume_id)

    def volume_named(self, name: str) -> Volume | None:
        with self.mutex:
            return next((v for v in self._volumes.values() if v.name == name), None)

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        with self.mutex:
            return self._snapshots.get(snapshot_id)

    def snapshot_named(self, name: str) -> Snapshot | None:
        with self.mutex:
            return next((s for s in self._snapshots.values() if s.name == name), None)

    def volumes(self) -> list[Volume]:
        with self.mutex:
            return list(self._volumes.values())

    def snapshots(self) -> list[Snapshot]:
        with self.mutex:
            return list(self._snapshots.values())

    def counts_locked(self) -> tuple[int, int]:
        """(volumes, snapshots); call with :attr:`mutex` held."""
        return len(self._volumes), len(self._snapshots)

    def provisioned_locked(self) -> int:
        """Sum of volume sizes; call with :attr:`mutex` held."""
        return sum(v.size for v in self._volumes.values())

    def provisioned(self) -> int:
        with self.mutex:
            return self.provisioned_locked()


@dataclass(frozen=True)
class Fill:
    """One physical fill level a pool must stay under: ``what`` is ``percent`` used, and
    the pool option ``option`` sets the ``limit`` (percent) at which it refuses."""

    what: str
    percent: float
    option: str
    limit: float


def physical_fill(size: int, used: int, max_used_percent: float) -> Fill:
    """The fill level of a filesystem ``size`` bytes large with ``used`` bytes used."""
    percent = 100.0 * used / size if size else 100.0
    return Fill("physical space", percent, "max_used_percent", max_used_percent)


def filesystem_usage(st: os.statvfs_result,
                     max_used_percent: float) -> tuple[int, int, list[Fill]]:
    """A filesystem's physical size and bytes used, from its ``statvfs``, and its fill
    level (the pools on a filesystem: filepool, nfs)."""
    size, used = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
    return size, used, [physical_fill(size, used, max_used_percent)]


@dataclass(frozen=True)
class Budget:
    """What :meth:`ThinBudget.state` reports for Capacity."""

    provisioned: int
    available: int
    volumes: int
    snapshots: int


class ThinBudget:
    """The overprovision budget of one pool over its :class:`ObjectIndex`.

    Physical fill levels refuse every new object, snapshots included. The ratio limits
    what a call adds (``extra`` bytes): a snapshot adds none, so only fill levels refuse
    it. ``size`` is the pool's physical size the ratio multiplies."""

    def __init__(self, index: ObjectIndex, where: str, overprovision_ratio: float) -> None:
        self.index = index
        self.where = where
        self.ratio = overprovision_ratio
        self._reserved = 0

    def refusal(self, size: int, fills: Sequence[Fill], extra: int) -> str | None:
        """Why ``extra`` more provisioned bytes would break a limit (None: it fits).
        Call with the index's mutex held."""
        for fill in fills:
            if fill.percent >= fill.limit:
                return (f"{self.where}: {fill.what} is {fill.percent:.1f}% used, at or over "
                        f"{fill.option}={fill.limit:g}")
        provisioned = self.index.provisioned_locked() + self._reserved
        allowed = int(size * self.ratio)
        if extra > 0 and provisioned + extra > allowed:
            return (f"{self.where}: provisioning {extra} more bytes would make "
                    f"{provisioned + extra} provisioned, over overprovision_ratio="
                    f"{self.ratio:g} x {size} bytes = {allowed} bytes")
        return None

    def refuse(self, size: int, fills: Sequence[Fill]) -> None:
        """ResourceExhausted when a fill level refuses a new object that adds no bytes."""
        with self.index.mutex:
            reason = self.refusal(size, fills, 0)
        if reason:
            raise ResourceExhausted(reason)

    @contextlib.contextmanager
    def reserve(self, size: int, fills: Sequence[Fill], extra: int) -> Iterator[None]:
        """Hold ``extra`` bytes of the budget while the caller builds (ResourceExhausted
        when they do not fit); what the caller committed is in the index by the end."""
        with self.index.mutex:
            reason = self.refusal(size, fills, extra)
            if reason:
                raise ResourceExhausted(reason)
            self._reserved += extra
        try:
            yield
        finally:
            with self.index.mutex:
                self._reserved -= extra

    def state(self, size: int, fills: Sequence[Fill], granularity: int = 1) -> Budget:
        """Provisioned bytes and what a new volume may still take (0 while a fill level
        refuses), rounded down to ``granularity``."""
        with self.index.mutex:
            provisioned = self.index.provisioned_locked()
            refusing = self.refusal(size, fills, 0) is not None
            headroom = int(size * self.ratio) - provisioned - self._reserved
            volumes, snapshots = self.index.counts_locked()
        available = 0 if refusing else max(0, headroom) // granularity * granularity
        return Budget(provisioned=provisioned, available=available, volumes=volumes,
                      snapshots=snapshots)
