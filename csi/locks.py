"""Per-key try-locks: a second operation on a busy name or id fails fast with ABORTED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from csi.errors import Aborted


class KeyedTryLock:
    """A set of held keys. ``hold(*keys)`` takes them all or raises :class:`Aborted`.

    Operations never queue behind each other: the CSI spec asks for ABORTED when an
    operation is already in flight for the same volume, and the CO retries.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {k for k in keys if k}
        with self._mutex:
            busy = sorted(wanted & self._held)
            if busy:
                raise Aborted(f"an operation on {busy[0]!r} is already in progress; retry later")
            self._held |= wanted
        try:
            yield
        finally:
            with self._mutex:
                self._held -= wanted

    def busy(self, key: str) -> bool:
        with self._mutex:
            return key in self._held
