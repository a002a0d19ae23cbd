"""The LVM command and report layer of one thin pool, apart from the pool type.

:class:`ThinPoolLvm` speaks in LVs of one ``vg/thin_pool``: it lists them (``lvs`` as a
JSON report, parsed into :class:`LV`), reads the thin pool's fill levels
(:class:`PoolStatus`), and runs ``lvcreate``/``lvchange``/``lvextend``/``lvremove``,
turning LVM's refusals into the driver's typed errors. :mod:`csi.pools.lvmthin` speaks in
volumes and snapshots and maps them to LVs and tags. Every command goes through
:meth:`csi.system.System.lvm` (a timeout, no udev), so the layer is faked in unit tests
by a System whose ``lvm``/``lvm_report`` answer from a table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from csi.errors import CommandFailed, FailedPrecondition, Internal, ResourceExhausted, Unavailable
from csi.system import LVM_LV_FIELDS, System

TAG_PREFIX = "fl."
#: how long a report of the VG's LVs stays fresh for read-only questions (conditions)
REPORT_TTL = 1.0
#: how old the thin pool's Data%/Meta% may be for limit checks and capacity: they move
#: with writes inside volumes, which the pool never sees, so a few seconds is as good
STATUS_TTL = 5.0


@dataclass(frozen=True)
class LV:
    """One row of ``lvs`` for this VG; ``tags`` are Flotilla's (``fl.`` stripped)."""

    name: str
    attr: str
    size: int
    tags: dict[str, str]
    pool_lv: str
    origin: str
    active: bool
    open: bool
    suspended: bool
    health: str
    data_percent: float | None
    metadata_percent: float | None
    metadata_size: int
    kernel_major: int
    kernel_minor: int

    @classmethod
    def from_report(cls, row: dict[str, str]) -> LV:
        tags = {}
        for tag in filter(None, row.get("lv_tags", "").split(",")):
            key, sep, value = tag.partition("=")
            if sep and key.startswith(TAG_PREFIX):
                tags[key[len(TAG_PREFIX):]] = value

        def pct(key: str) -> float | None:
            value = row.get(key, "")
            return float(value) if value else None

        def num(key: str) -> int:
            value = row.get(key, "")
            return int(value) if value.lstrip("-").isdigit() else -1

        return cls(
            name=row["lv_name"], attr=row.get("lv_attr", ""), size=max(0, num("lv_size")),
            tags=tags, pool_lv=row.get("pool_lv", ""), origin=row.get("origin", ""),
            active=row.get("lv_active", "") == "active",
            open=row.get("lv_device_open", "") == "open",
            suspended=row.get("lv_suspended", "") == "suspended",
            health=row.get("lv_health_status", ""),
            data_percent=pct("data_percent"), metadata_percent=pct("metadata_percent"),
            metadata_size=max(0, num("lv_metadata_size")),
            kernel_major=num("lv_kernel_major"), kernel_minor=num("lv_kernel_minor"),
        )


@dataclass(frozen=True)
class PoolStatus:
    size: int  # data space
    metadata_size: int
    data_percent: float
    metadata_percent: float
    health: str

    @property
    def physical(self) -> int:
        return self.size + self.metadata_size

    @property
    def used(self) -> int:
        return int(self.size * self.data_percent / 100.0
                   + self.metadata_size * self.metadata_percent / 100.0)


def tag_args(tags: dict[str, str]) -> list[str]:
    """``--addtag fl.<key>=<value>`` for each tag."""
    args = []
    for key, value in tags.items():
        args += ["--addtag", f"{TAG_PREFIX}{key}={value}"]
    return args


class ThinPoolLvm:
    """LVM commands and reports for the thin pool ``vg/thin_pool`` of pool ``pool``."""

    def __init__(self, system: System, pool: str, vg: str, thin_pool: str) -> None:
        self.system = system
        self.pool = pool
        self.vg = vg
        self.thin_pool = thin_pool
        self._report_cache: tuple[float, list[LV]] | None = None
        self._status_cache: tuple[float, PoolStatus] | None = None

    def path(self, lv: str) -> str:
        return f"{self.vg}/{lv}"

    def dm_name(self, lv: str) -> str:
        return self.vg.replace("-", "--") + "-" + lv.replace("-", "--")

    # ---- reports --------------------------------------------------------------------

    def extent_size(self) -> int:
        """The VG's extent size (every LV size is a multiple of it); Unavailable when the
        lvm command or the VG is missing."""
        try:
            vgs = self.system.lvm_report("vgs", ["vg_name", "vg_extent_size"], [self.vg])
        except FileNotFoundError:
            raise Unavailable(f"pool {self.pool!r}: the lvm command is not installed "
                              "(Debian/Ubuntu package lvm2, plus thin-provisioning-tools)"
                              ) from None
        except CommandFailed as err:
            raise Unavailable(f"pool {self.pool!r}: volume group {self.vg!r} is not usable "
                              f"({err}); create it as docs/lvmthin.md describes") from None
        if not vgs:
            raise Unavailable(f"pool {self.pool!r}: volume group {self.vg!r} not found")
        return int(vgs[0]["vg_extent_size"])

    def report(self, fresh: bool = True) -> list[LV]:
        """All LVs of the VG; a cached copy up to REPORT_TTL old when ``fresh`` is False."""
        now = time.monotonic()
        cached = self._report_cache
        if not fresh and cached is not None and now - cached[0] < REPORT_TTL:
            return cached[1]
        try:
            rows = self.system.lvm_report("lvs", LVM_LV_FIELDS, [self.vg])
        except CommandFailed as err:
            raise Unavailable(f"pool {self.pool!r}: cannot list the LVs of volume group "
                              f"{self.vg!r}: {err}") from None
        lvs = [LV.from_report(r) for r in rows]
        self._report_cache = (time.monotonic(), lvs)
        pool = next((x for x in lvs if x.name == self.thin_pool), None)
        if (pool is not None and pool.attr.startswith("t") and pool.data_percent is not None
                and pool.metadata_percent is not None):
            self._status_cache = (time.monotonic(), PoolStatus(
                size=pool.size, metadata_size=pool.metadata_size,
                data_percent=pool.data_percent, metadata_percent=pool.metadata_percent,
                health=pool.health))
        else:
            self._status_cache = None
        return lvs

    def find(self, lv: str, fresh: bool = True) -> LV | None:
        return next((x for x in self.report(fresh) if x.name == lv), None)

    def status(self) -> PoolStatus:
        """The thin pool's size and fill levels, at most STATUS_TTL seconds old."""
        cached = self._status_cache
        if cached is not None and time.monotonic() - cached[0] < STATUS_TTL:
            return cached[1]
        pool = self.find(self.thin_pool)
        if pool is None or not pool.attr.startswith("t"):
            raise Unavailable(f"pool {self.pool!r}: thin pool {self.vg}/{self.thin_pool} is "
                              "missing; create it as docs/lvmthin.md describes")
        if pool.data_percent is None or pool.metadata_percent is None:
            raise Unavailable(f"pool {self.pool!r}: thin pool {self.vg}/{self.thin_pool} is "
                              "not active; activate it with lvchange -ay "
                              f"{self.vg}/{self.thin_pool}")
        assert self._status_cache is not None
        return self._status_cache[1]

    # ---- commands -------------------------------------------------------------------

    def run(self, command: str, *args: str) -> None:
        """One ``lvm`` command; a full thin pool is ResourceExhausted. Reports taken
        before it are stale after it."""
        self._report_cache = None
        try:
            self.system.lvm(command, *args)
        except CommandFailed as err:
            text = err.stderr
            if ("free space in thin pool" in text or "Insufficient free space" in text
                    or "out of data space" in text):
                raise ResourceExhausted(
                    f"pool {self.pool!r}: thin pool {self.vg}/{self.thin_pool} has no room: "
                    f"{text[-300:]}") from None
            raise
        finally:
            self._report_cache = None

    def activate(self, lv: str) -> str:
        """Activate ``lv`` (even with its activation skip flag): its block device."""
        self.run("lvchange", "--activate", "y", "--ignoreactivationskip", self.path(lv))
        device = self.device(lv)
        if device is None:
            raise Internal(f"LV {self.vg}/{lv} was activated but no device-mapper device "
                           f"{self.dm_name(lv)} appeared")
        return device

    def deactivate(self, lv: str) -> None:
        self.run("lvchange", "--activate", "n", self.path(lv))

    def device(self, lv: str) -> str | None:
        """The block device of an active LV (None when inactive)."""
        return self.system.dm_device(self.dm_name(lv))

    def resume(self, lv: str) -> None:
        """Resume an LV an interrupted command left suspended."""
        self.system.run(["dmsetup", "resume", self.dm_name(lv)])

    def grow(self, lv: str, size: int) -> None:
        """``lvextend`` to at least ``size``; an LV already that large is fine."""
        try:
            self.run("lvextend", "--size", f"{size}b", self.path(lv))
        except CommandFailed as err:
            if "matches existing size" in err.stderr or "not larger than" in err.stderr:
                return
            raise

    def remove(self, lv: str) -> None:
        """``lvremove`` (missing is fine); FailedPrecondition while it is open."""
        try:
            self.run("lvremove", "--force", self.path(lv))
        except CommandFailed as err:
            if "Failed to find logical volume" in err.stderr:
                return
            if "in use" in err.stderr or "open logical volume" in err.stderr:
                raise FailedPrecondition(
                    f"{self.vg}/{lv} is in use on this node (mounted or open); unpublish "
                    f"and unstage it first: {err.stderr[-200:]}") from None
            raise
