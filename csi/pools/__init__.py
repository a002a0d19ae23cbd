"""Storage pools. ``build_pool`` turns one entry of the pool config into a Pool;
``PoolSet`` holds the configured pools and keeps one that cannot start from taking the
others down."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from csi.errors import FlotillaError, InvalidArgument, Unavailable
from csi.pools.base import Pool, parse_id
from csi.pools.filepool import FilePool
from csi.pools.lvmthin import LvmThinPool
from csi.pools.nfs import NfsPool
from csi.system import System

log = logging.getLogger(__name__)

PoolFactory = Callable[[str, dict[str, object], System], Pool]

POOL_TYPES: dict[str, PoolFactory] = {
    "filepool": FilePool,
    "lvmthin": LvmThinPool,
    "nfs": NfsPool,
}
#: the pool types whose snapshots can be backed up (they declare :attr:`Pool.backups`)
BACKUP_POOL_TYPES = tuple(cls.type for cls in (FilePool, LvmThinPool, NfsPool) if cls.backups)

#: seconds before the first background retry of a pool that failed to start; each
#: further failure doubles the wait, up to RETRY_MAX
RETRY_FIRST = 5.0
RETRY_MAX = 300.0


def build_pool(spec: dict[str, object], system: System, instance: str = "",
               state_dir: str = "") -> Pool:
    """The pool one config entry describes. ``instance`` names this process among those
    sharing the pool's storage (see :attr:`Pool.instance`; empty: the host name);
    ``state_dir`` is the driver's --state-dir (:attr:`Pool.state_dir`)."""
    name = spec.get("name")
    kind = spec.get("type")
    if not isinstance(name, str):
        raise InvalidArgument(f"pool entry {spec!r} needs a string 'name'")
    if kind not in POOL_TYPES:
        raise InvalidArgument(
            f"pool {name!r}: type {kind!r} is not one of {', '.join(sorted(POOL_TYPES))}"
        )
    pool = POOL_TYPES[str(kind)](name, spec, system)
    if instance:
        pool.instance = instance
    if state_dir:
        pool.state_dir = os.path.abspath(state_dir)
    return pool


@dataclass(frozen=True)
class PoolFailure:
    """Why a configured pool is not serving: its last start attempt failed."""

    error: str
    attempts: int  # failed start attempts so far
    since: float  # time.time() of the first failure
    retry_in: float  # seconds from the last attempt to the next one
    last: float  # time.time() of the last attempt

    def next_retry(self, now: float | None = None) -> float:
        """Seconds until the next attempt (0 when it is due)."""
        return max(0.0, self.last + self.retry_in - (time.time() if now is None else now))


class PoolDown(Unavailable):
    """A request needs a pool whose start failed (UNAVAILABLE).

    UNAVAILABLE rather than FAILED_PRECONDITION: the condition is transient and clears
    without any action of the caller (the driver keeps retrying the start in the
    background, and serves the pool as soon as it starts), which is what gRPC defines
    UNAVAILABLE for: "retry with a backoff". FAILED_PRECONDITION tells a caller not to
    retry until it has changed the system's state itself, and the CSI spec reserves it
    for states of the volume the caller must fix (published elsewhere, has snapshots).
    The external-provisioner and kubelet treat UNAVAILABLE as retryable (for CreateVolume
    a non-final error), so they come back with the same request.
    """

    def __init__(self, pool: str, failure: PoolFailure) -> None:
        self.pool = pool
        self.failure = failure
        super().__init__(
            f"pool {pool!r} is not serving: it could not start ({failure.error}); the "
            f"driver retries in the background (attempt {failure.attempts} failed, next in "
            f"{failure.next_retry():.0f}s)")


#: called with (pool name, failure or None when the pool has just started) after every
#: start attempt that failed, and after a background attempt that succeeded
PoolListener = Callable[[str, "PoolFailure | None"], None]


class PoolSet:
    """The configured pools, in order; the first is the default.

    :meth:`start` starts each pool on its own: one that fails is recorded (its error,
    attempts, next retry) and retried in the background with capped exponential backoff
    (RETRY_FIRST doubling to RETRY_MAX) until it starts; the others serve meanwhile.
    While a pool is down, :meth:`named` and :meth:`owner` raise :class:`PoolDown` for it
    and iteration skips it, so servicers need no special case: a request that targets
    the pool answers UNAVAILABLE naming it and its start error, the rest never see it.
    """

    def __init__(self, pools: list[Pool], retry_first: float = RETRY_FIRST,
                 retry_max: float = RETRY_MAX) -> None:
        if not pools:
            raise InvalidArgument("at least one pool must be configured")
        self.pools = {p.name: p for p in pools}
        self.default = pools[0]
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._failed: dict[str, PoolFailure] = {}
        self._lock = threading.Lock()
        self._listeners: list[PoolListener] = []
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._retrier: threading.Thread | None = None

    def __iter__(self) -> Iterator[Pool]:
        """The pools that can be asked (started, or not started yet); not the failed."""
        with self._lock:
            return iter([p for p in self.pools.values() if p.name not in self._failed])

    def all(self) -> list[Pool]:
        """Every configured pool, failed ones included."""
        return list(self.pools.values())

    def failure(self, name: str) -> PoolFailure | None:
        """Why the pool ``name`` is down (None: it is serving or not started yet)."""
        with self._lock:
            return self._failed.get(name)

    def failures(self) -> dict[str, PoolFailure]:
        with self._lock:
            return dict(self._failed)

    def _require_up(self, pool: Pool) -> Pool:
        failure = self.failure(pool.name)
        if failure is not None:
            raise PoolDown(pool.name, failure)
        return pool

    def named(self, name: str | None) -> Pool:
        """The pool a ``pool`` parameter names (the default pool when empty).

        Raises: InvalidArgument (no such pool), PoolDown (its start failed).
        """
        if not name:
            return self._require_up(self.default)
        pool = self.pools.get(name)
        if pool is None:
            raise InvalidArgument(
                f"parameter pool={name!r} names no configured pool; configured: "
                f"{', '.join(self.pools)}"
            )
        return self._require_up(pool)

    def owner(self, object_id: str) -> Pool | None:
        """The pool a volume or snapshot id belongs to (None when it is not ours).

        Raises: PoolDown (the id's pool is configured but its start failed).
        """
        parsed = parse_id(object_id)
        pool = self.pools.get(parsed[0]) if parsed else None
        return self._require_up(pool) if pool is not None else None

    # ---- lifecycle ------------------------------------------------------------------

    def watch(self, listener: PoolListener, replay: bool = False) -> None:
        """Call ``listener`` after each start attempt that failed and each background
        start that succeeded; ``replay``: call it now for every pool already down."""
        with self._lock:
            self._listeners.append(listener)
            current = dict(self._failed)
        if replay:
            for name, failure in current.items():
                self._notify_one(listener, name, failure)

    def _notify(self, name: str, failure: PoolFailure | None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            self._notify_one(listener, name, failure)

    @staticmethod
    def _notify_one(listener: PoolListener, name: str, failure: PoolFailure | None) -> None:
        try:
            listener(name, failure)
        except Exception:
            log.exception("pool %s: a listener of its start failed", name)

    def _attempt(self, pool: Pool) -> bool:
        """One start attempt; a failure is recorded (never raised). True: started."""
        try:
            pool.start()
        except Exception as err:  # any failure of one pool must leave the others serving
            try:
                pool.stop()  # release what the failed start took (a lock, a mount)
            except Exception as stop_err:
                log.warning("pool %s: releasing a failed start: %s", pool.name, stop_err)
            now = time.time()
            with self._lock:
                old = self._failed.get(pool.name)
                delay = self.retry_first if old is None else min(old.retry_in * 2,
                                                                 self.retry_max)
                failure = PoolFailure(error=str(err) or type(err).__name__,
                                      attempts=(old.attempts if old else 0) + 1,
                                      since=old.since if old else now, retry_in=delay,
                                      last=now)
                self._failed[pool.name] = failure
            log.warning("pool %s (%s) cannot start (attempt %d): %s; retrying in %.0fs",
                        pool.name, pool.type, failure.attempts, failure.error, delay,
                        exc_info=not isinstance(err, FlotillaError | OSError))
            self._notify(pool.name, failure)
            return False
        with self._lock:
            old = self._failed.pop(pool.name, None)
        if old is not None:
            log.info("pool %s (%s) started after %d failed attempts; serving it", pool.name,
                     pool.type, old.attempts)
            self._notify(pool.name, None)
        return True

    def start(self) -> None:
        """Start every pool; the ones that fail are retried in the background."""
        for pool in self.pools.values():
            self._attempt(pool)
        if self.failures():
            self._retrier = threading.Thread(target=self._retry_loop, name="pool-retry",
                                             daemon=True)
            self._retrier.start()

    def _retry_loop(self) -> None:
        while not self._stopping.is_set():
            failures = self.failures()
            if not failures:
                return
            name, failure = min(failures.items(), key=lambda kv: kv[1].next_retry())
            wait = failure.next_retry()
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            if self._attempt(self.pools[name]) and self._stopping.is_set():
                self.pools[name].stop()  # started while the driver was stopping

    def retry_now(self) -> None:
        """Make every failed pool's next attempt due now (tests, an admin's nudge)."""
        with self._lock:
            self._failed = {n: PoolFailure(f.error, f.attempts, f.since, f.retry_in,
                                           f.last - f.retry_in)
                            for n, f in self._failed.items()}
        self._wake.set()

    def stop(self) -> None:
        """Stop retrying, then release every started pool."""
        self._stopping.set()
        self._wake.set()
        if self._retrier is not None:
            self._retrier.join(timeout=30)
        for pool in self:
            pool.stop()
