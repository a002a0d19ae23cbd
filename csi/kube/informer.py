"""A list + watch cache of one resource type (the informer pattern, minimal).

A thread lists the objects, then watches from the list's resourceVersion; when the
watch ends it watches again from the last version seen, and when that version is too
old (410 Gone) or the API fails it lists again after a backoff. Every (re)list replaces
the store and calls the handler for every object, so consumers resync after a broken
watch or a restart without extra code. Waiters block on a condition variable until a
predicate over the store holds or their deadline passes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from csi.kube.api import ApiUnavailable, Gone, KubeApi, Obj

log = logging.getLogger(__name__)

#: (event type, object); event type ADDED/MODIFIED/DELETED, or SYNC for a (re)list
Handler = Callable[[str, Obj], None]
WATCH_SECONDS = 240
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


class Informer:
    def __init__(self, api: KubeApi, plural: str, label_selector: str = "",
                 handler: Handler | None = None) -> None:
        self.api = api
        self.plural = plural
        self.selector = label_selector
        self.handler = handler
        self._store: dict[str, Obj] = {}
        self._cond = threading.Condition()
        self._synced = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.plural}",
                                        daemon=True)
        self._thread.start()

    def wait_synced(self, timeout: float) -> bool:
        return self.wait_for(lambda _: self._synced, timeout) is not None

    def stop(self) -> None:
        self._stopping.set()
        self.api.close()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def synced(self) -> bool:
        return self._synced

    # ---- reading --------------------------------------------------------------------

    def get(self, name: str) -> Obj | None:
        with self._cond:
            return self._store.get(name)

    def items(self) -> list[Obj]:
        with self._cond:
            return list(self._store.values())

    def find(self, pred: Callable[[Obj], bool]) -> Obj | None:
        with self._cond:
            return next((o for o in self._store.values() if pred(o)), None)

    def wait_for(self, pred: Callable[[dict[str, Obj]], Any], timeout: float) -> Any:
        """Block until ``pred(store)`` returns something truthy; return it (None: timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = pred(self._store)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return None
                self._cond.wait(left)

    def apply(self, obj: Obj) -> None:
        """Put an object the caller just wrote (create/patch reply) into the store early.

        Only a newer resourceVersion replaces what is there, so a stale reply never
        overwrites a watch event.
        """
        name = obj["metadata"]["name"]
        with self._cond:
            old = self._store.get(name)
            if old is not None and _rv(old) >= _rv(obj):
                return
            self._store[name] = obj
            self._cond.notify_all()

    # ---- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                version = self._relist()
                failures = 0
                while not self._stopping.is_set():
                    version = self._watch(version)
            except Gone:
                log.info("watch of %s expired; listing again", self.plural)
            except (ApiUnavailable, OSError) as err:
                self._failed(err)
            except Exception as err:
                log.exception("informer %s failed", self.plural)
                self._failed(err)
            if self._stopping.is_set():
                return
            delay = BACKOFF[min(failures, len(BACKOFF) - 1)] * (1 + random.random() / 2)  # noqa: S311
            failures += 1
            self._stopping.wait(delay)

    def _failed(self, err: Exception) -> None:
        self.last_error = str(err)
        log.warning("informer %s: %s; retrying", self.plural, err)

    def _relist(self) -> str:
        items, version = self.api.list(self.plural, self.selector)
        store = {o["metadata"]["name"]: o for o in items}
        with self._cond:
            gone = [o for n, o in self._store.items() if n not in store]
            self._store = store
            self._synced = True
            self.last_error = ""
            self._cond.notify_all()
        for obj in gone:
            self._dispatch("DELETED", obj)
        for obj in items:
            self._dispatch("SYNC", obj)
        return version

    def _watch(self, version: str) -> str:
        for kind, obj in self.api.watch(self.plural, self.selector, version, WATCH_SECONDS):
            if self._stopping.is_set():
                break
            meta = obj.get("metadata", {})
            version = meta.get("resourceVersion", version)
            if kind == "BOOKMARK":
                continue
            name = meta["name"]
            with self._cond:
                if kind == "DELETED":
                    self._store.pop(name, None)
                else:
                    self._store[name] = obj
                self._cond.notify_all()
            self._dispatch(kind, obj)
        return version

    def _dispatch(self, kind: str, obj: Obj) -> None:
        if self.handler is None:
            return
        try:
            self.handler(kind, obj)
        except Exception:
            log.exception("handler of %s failed on %s", self.plural,
                          obj.get("metadata", {}).get("name"))


def _rv(obj: Obj) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion", "0"))
    except ValueError:
        return 0
