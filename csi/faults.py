"""Test-only crash points: ``FLOTILLA_CRASH_AT=name[:n]`` kills the process (SIGKILL) the
n-th time (default 1st) execution reaches ``crashpoint(name)``. Unset, it costs one dict
lookup. The reliability tier uses it to prove that a kill at any step converges."""

from __future__ import annotations

import os
import signal
import threading

_ENV = "FLOTILLA_CRASH_AT"
_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(_ENV)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


_TARGET = _target()


def crashpoint(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
