"""Which pools are node-local, and which node a new volume goes to.

The seam for shared pools: a pool type is node-local unless its class says otherwise.
A class may set ``node_local`` explicitly; without it, ``multi_node`` (can serve
several nodes at once, e.g. nfs) means shared. Shared pools are driven by the
controller itself; node-local ones through custom resources and node agents.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from csi.pools.base import Pool


def is_node_local(pool: Pool | type[Pool]) -> bool:
    explicit = getattr(pool, "node_local", None)
    if isinstance(explicit, bool):
        return explicit
    return not pool.multi_node


@dataclass(frozen=True)
class Placement:
    """The nodes a CreateVolume may use, from its accessibility requirements."""

    preferred: tuple[str, ...] = ()
    requisite: tuple[str, ...] = ()

    def allows(self, node: str) -> bool:
        return not self.requisite or node in self.requisite

    def choose(self) -> str | None:
        """The first preferred node the requisite allows (WaitForFirstConsumer puts the
        scheduler's choice first), else the first requisite node, else None."""
        for node in self.preferred:
            if self.allows(node):
                return node
        return self.requisite[0] if self.requisite else None


_current: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "flotilla_placement", default=None)


@contextlib.contextmanager
def placement(p: Placement) -> Iterator[None]:
    """Make ``p`` the placement of the CreateVolume running in this thread."""
    token = _current.set(p)
    try:
        yield
    finally:
        _current.reset(token)


def current_placement() -> Placement:
    return _current.get() or Placement()
