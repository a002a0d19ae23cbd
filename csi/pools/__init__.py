"""Storage pools. ``build_pool`` turns one entry of the pool config into a Pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from csi.errors import InvalidArgument
from csi.pools.base import Pool, parse_id
from csi.pools.filepool import FilePool
from csi.pools.lvmthin import LvmThinPool
from csi.pools.nfs import NfsPool
from csi.system import System

PoolFactory = Callable[[str, dict[str, object], System], Pool]

POOL_TYPES: dict[str, PoolFactory] = {
    "filepool": FilePool,
    "lvmthin": LvmThinPool,
    "nfs": NfsPool,
}


def build_pool(spec: dict[str, object], system: System) -> Pool:
    name = spec.get("name")
    kind = spec.get("type")
    if not isinstance(name, str):
        raise InvalidArgument(f"pool entry {spec!r} needs a string 'name'")
    if kind not in POOL_TYPES:
        raise InvalidArgument(
            f"pool {name!r}: type {kind!r} is not one of {', '.join(sorted(POOL_TYPES))}"
        )
    return POOL_TYPES[str(kind)](name, spec, system)


class PoolSet:
    """The configured pools, in order; the first is the default."""

    def __init__(self, pools: list[Pool]) -> None:
        if not pools:
            raise InvalidArgument("at least one pool must be configured")
        self.pools = {p.name: p for p in pools}
        self.default = pools[0]

    def __iter__(self) -> Iterator[Pool]:
        return iter(self.pools.values())

    def named(self, name: str | None) -> Pool:
        """The pool a ``pool`` parameter names (the default pool when empty)."""
        if not name:
            return self.default
        pool = self.pools.get(name)
        if pool is None:
            raise InvalidArgument(
                f"parameter pool={name!r} names no configured pool; configured: "
                f"{', '.join(self.pools)}"
            )
        return pool

    def owner(self, object_id: str) -> Pool | None:
        """The pool a volume or snapshot id belongs to (None when it is not ours)."""
        parsed = parse_id(object_id)
        return self.pools.get(parsed[0]) if parsed else None

    def start(self) -> None:
        for pool in self:
            pool.start()

    def stop(self) -> None:
        for pool in self:
            pool.stop()
