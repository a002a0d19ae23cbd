"""The storage pool interface every backend implements.

Rules for implementations:

* Every method is idempotent: calling it again with the same arguments after success
  (or after a crash half-way) converges to the same single object.
* Errors are the typed exceptions of :mod:`csi.errors`; each method lists which ones.
* Pools do not lock per name or id (the servicers hold try-locks); they guard their own
  in-memory indexes and capacity accounting.
* The storage is the source of truth: :meth:`Pool.start` rebuilds everything from it and
  removes what half-finished operations left behind.
"""

from __future__ import annotations

import abc
import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from csi.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from csi.validation import parse_size

if TYPE_CHECKING:
    from csi.pools.access import Access

ID_RE = re.compile(r"^(?P<pool>[a-z0-9][a-z0-9-]{0,31}):(?P<kind>vol|snap)-(?P<uid>[0-9a-f]{32})$")
POOL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")

SourceKind = Literal["snapshot", "volume"]


def new_id(pool: str, kind: Literal["vol", "snap"]) -> str:
    """A fresh volume or snapshot id: ``<pool>:<kind>-<32 hex>`` (at most 70 bytes)."""
    return f"{pool}:{kind}-{uuid.uuid4().hex}"


def parse_id(object_id: str) -> tuple[str, str, str] | None:
    """Split an id into (pool, kind, uid); None when it is not one of ours."""
    m = ID_RE.match(object_id)
    if not m:
        return None
    return m["pool"], m["kind"], m["uid"]


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    id: str


@dataclass
class Volume:
    id: str
    name: str
    pool: str
    size: int
    fs_type: str = ""
    source: Source | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)


@dataclass
class Snapshot:
    id: str
    name: str
    pool: str
    source_volume_id: str
    size: int
    created: float = field(default_factory=time.time)
    ready: bool = True
    parameters: dict[str, str] = field(default_factory=dict)
    #: why it is not ready yet (e.g. "backup to 'nas' in progress"); empty when ready
    message: str = ""


@dataclass(frozen=True)
class Placement:
    """The nodes a CreateVolume may use, from its accessibility requirements (node ids
    of the topology key; empty: no constraint)."""

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


@dataclass(frozen=True)
class VolumeRequest:
    """A resolved CreateVolume: the servicer has validated names and computed ``size``."""

    name: str
    size: int  # what to provision: required size rounded up, or the default
    required: int  # the request's capacity range, for idempotency checks
    limit: int  # 0: no limit
    fs_type: str
    block: bool
    source: Source | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    #: where the volume may go; only a pool spanning nodes (KubePool) reads it, and two
    #: requests differing only in placement are the same request (a retry may move)
    placement: Placement = field(default=Placement(), compare=False)


@dataclass(frozen=True)
class Capacity:
    size: int  # physical bytes of the pool
    used: int  # physical bytes in use
    provisioned: int  # sum of the volumes' sizes
    available: int  # largest new volume the limits allow now (0 when refusing)
    volumes: int
    snapshots: int
    extra: dict[str, float] = field(default_factory=dict)  # pool-specific gauges


@dataclass(frozen=True)
class Condition:
    abnormal: bool
    message: str


#: the attributes that describe what a pool type can do (see :class:`Pool`); wrappers
#: and stand-ins (:class:`PoolWrapper`, the controller's KubePool) copy them from the
#: pool they stand for
CAPABILITIES = ("type", "node_local", "multi_node", "network", "block", "backups",
                "node_expansion", "granularity", "default_size", "mount_options",
                "mount_timeout")


class Pool(abc.ABC):
    """A storage backend. See the module docstring for the rules.

    What a pool type can do is declared by the class attributes below (the capabilities,
    listed in :data:`CAPABILITIES`); the servicers, the node agent, the backups and the
    wiring read them and nothing else: no code outside a pool checks its class.
    """

    type: str = ""
    #: the storage lives on one node (a loop image, a thin LV): its volumes are reachable
    #: only there, so they carry that node's topology, and in the distributed mode the
    #: controller drives them through custom resources and that node's agent. False: any
    #: node reaches the storage (nfs); the controller drives it itself.
    node_local: bool = True
    #: can serve the multi-node access modes (ReadWriteMany, ReadOnlyMany)
    multi_node: bool = False
    #: nodes mount volumes over the network (:meth:`mount_source`) instead of attaching
    #: them as block devices (:meth:`attach`)
    network: bool = False
    #: can serve raw block volumes
    block: bool = True
    #: snapshots can be backed up and volumes restored from a backup target: the pool
    #: implements :meth:`read_snapshot` and :meth:`write_volume`
    backups: bool = False
    #: does a grown volume need NodeExpandVolume (a filesystem to grow)?
    node_expansion: bool = True
    #: smallest unit sizes are rounded up to (a pool may learn it in :meth:`start`)
    granularity: int = 1 << 20
    #: size of a volume whose request leaves the size open
    default_size: int = 1 << 30
    #: options the node adds when it mounts a filesystem of this pool (e.g. discard)
    mount_options: tuple[str, ...] = ()
    #: seconds a node may wait for a network mount of this pool
    mount_timeout: float = 60.0
    #: this process among those sharing the pool's storage (set at wiring time from the
    #: node id and mode): a shared pool keeps its scratch space apart by it
    instance: str = ""
    #: the driver's --state-dir (set at wiring time; empty: the default): where a pool
    #: keeps host-side paths its options leave open
    state_dir: str = ""

    def take_capabilities(self, other: Pool) -> None:
        """Declare what ``other`` declares (:data:`CAPABILITIES`): for a pool that stands
        for another (a wrapper, the controller's KubePool)."""
        for key in CAPABILITIES:
            setattr(self, key, getattr(other, key))

    def __init__(self, name: str, options: dict[str, object]) -> None:
        if not POOL_NAME_RE.match(name):
            raise InvalidArgument(
                f"pool name {name!r} must be 1-32 characters of a-z, 0-9 and '-', "
                "starting with a letter or digit"
            )
        self.name = name
        self.options = options

    # ---- lifecycle ------------------------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Prepare the storage, take ownership, reconcile half-finished work.

        Raises: Unavailable (storage unusable, with the fix), InvalidArgument (options).
        """

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` took (locks); leaves volumes in place."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise Unavailable when the pool cannot serve requests right now."""

    # ---- volumes --------------------------------------------------------------------

    @abc.abstractmethod
    def create_volume(self, req: VolumeRequest) -> Volume:
        """Create (or return the existing, compatible) volume named ``req.name``.

        Raises: AlreadyExists (same name, incompatible size/source/parameters),
        NotFound (source missing), OutOfRange (size smaller than the source),
        ResourceExhausted (a pool limit, named in the message), Internal.
        """

    @abc.abstractmethod
    def delete_volume(self, volume_id: str) -> None:
        """Delete a volume; its snapshots and clones stay intact. Missing: no error."""

    @abc.abstractmethod
    def expand_volume(self, volume_id: str, size: int) -> Volume:
        """Grow to at least ``size``; smaller or equal is a no-op.

        Raises: NotFound, ResourceExhausted, Internal.
        """

    @abc.abstractmethod
    def get_volume(self, volume_id: str) -> Volume | None: ...

    @abc.abstractmethod
    def find_volume(self, name: str) -> Volume | None: ...

    @abc.abstractmethod
    def list_volumes(self) -> list[Volume]: ...

    @abc.abstractmethod
    def volume_condition(self, volume_id: str) -> Condition: ...

    # ---- snapshots ------------------------------------------------------------------

    @abc.abstractmethod
    def create_snapshot(
        self, name: str, source_volume_id: str, parameters: dict[str, str]
    ) -> Snapshot:
        """Crash-consistent, read-only snapshot (idempotent by name).

        Raises: AlreadyExists (name used for another source), NotFound (source),
        ResourceExhausted, Internal.
        """

    @abc.abstractmethod
    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot; volumes restored from it stay intact. Missing: no error."""

    @abc.abstractmethod
    def get_snapshot(self, snapshot_id: str) -> Snapshot | None: ...

    @abc.abstractmethod
    def find_snapshot(self, name: str) -> Snapshot | None: ...

    @abc.abstractmethod
    def list_snapshots(self) -> list[Snapshot]: ...

    def source_of(self, req: VolumeRequest) -> Volume | Snapshot | None:
        """The snapshot or volume ``req`` restores or clones (None: a new empty volume).

        Raises: NotFound (no such source in this pool), OutOfRange (``req.size`` is
        smaller than the source).
        """
        if req.source is None:
            return None
        found: Volume | Snapshot | None = (
            self.get_snapshot(req.source.id) if req.source.kind == "snapshot"
            else self.get_volume(req.source.id))
        if found is None:
            raise NotFound(f"source {req.source.kind} {req.source.id} does not exist in "
                           f"pool {self.name!r}")
        if req.size < found.size:
            raise OutOfRange(
                f"requested {req.size} bytes is smaller than the source's {found.size} "
                "bytes; a volume can only be restored or cloned at the same size or larger")
        return found

    def snapshot_request(self, name: str, source_volume_id: str) -> Snapshot | Volume:
        """The start of every create_snapshot: the snapshot already made under ``name``
        for this source (an idempotent retry), else the source volume to snapshot.

        Raises: AlreadyExists (the name is taken by another source), NotFound (source).
        """
        existing = self.find_snapshot(name)
        if existing is not None:
            if existing.source_volume_id != source_volume_id:
                raise AlreadyExists(f"snapshot {name!r} exists for volume "
                                    f"{existing.source_volume_id}, not {source_volume_id}")
            return existing
        vol = self.get_volume(source_volume_id)
        if vol is None:
            raise NotFound(f"source volume {source_volume_id} does not exist")
        return vol

    def check_snapshot_parameters(self, parameters: dict[str, str]) -> None:
        """Refuse snapshot parameters this pool cannot honour (before anything is made).

        A plain pool honours none: ``backupTarget`` needs a backup target, which the
        driver's wiring adds by wrapping the pool (:mod:`csi.backup.pool`).

        Raises: InvalidArgument.
        """
        for key in parameters:
            raise InvalidArgument(f"parameter {key}: no backup_targets are configured "
                                  "(see docs/backups.md)")

    # ---- backups (pools that declare :attr:`backups`) ------------------------------

    def read_snapshot(self, snapshot_id: str) -> contextlib.AbstractContextManager[str]:
        """A path from which the snapshot's whole content reads as one image (a file
        or a block device), valid inside the ``with``.

        Raises: NotFound, InvalidArgument (the pool does not declare :attr:`backups`).
        """
        raise InvalidArgument(f"pool {self.name!r} ({self.type}) cannot be backed up: "
                              "its snapshots are not block images")

    def write_volume(self, volume_id: str) -> contextlib.AbstractContextManager[str]:
        """A path to which a freshly created, empty volume's content is written as one
        image, valid inside the ``with``; by default its block device, attached for the
        time of the ``with``.

        Raises: NotFound, InvalidArgument (the pool does not declare :attr:`backups`),
        Internal.
        """
        if not self.backups:
            raise InvalidArgument(f"pool {self.name!r} ({self.type}) cannot be restored "
                                  "from a backup: its volumes are not block images")
        return self._attached(volume_id)

    @contextlib.contextmanager
    def _attached(self, volume_id: str) -> Iterator[str]:
        device = self.attach(volume_id)
        try:
            yield device
        finally:
            self.detach(volume_id)

    # ---- capacity -------------------------------------------------------------------

    @abc.abstractmethod
    def capacity(self) -> Capacity: ...

    # ---- node side ------------------------------------------------------------------

    @abc.abstractmethod
    def attach(self, volume_id: str) -> str:
        """Make the volume a block device on this node and return its path (idempotent).

        Raises: NotFound, Internal.
        """

    @abc.abstractmethod
    def detach(self, volume_id: str) -> None:
        """Undo :meth:`attach` (idempotent)."""

    def mount_source(self, volume_id: str) -> str:
        """What a node mounts for a :attr:`network` pool's volume (e.g. server:/path)."""
        raise NotImplementedError(f"{self.type} volumes are attached, not mounted remotely")

    @abc.abstractmethod
    def device_of(self, volume_id: str) -> str | None:
        """The block device of an attached volume on this node, or None."""

    @abc.abstractmethod
    def refresh_device(self, volume_id: str) -> int:
        """Make an attached device show the volume's current size; return that size."""

    def node_access(self, volume_id: str) -> Access:
        """How this node reaches the volume (cheap, no I/O; the volume need not exist).

        By default the volume is attached as a block device (:meth:`attach`), formatted,
        mounted at the staging path and bound from there
        (:class:`~csi.pools.access.AttachedAccess`); a pool whose nodes mount volumes
        over the network returns a :class:`~csi.pools.access.NetworkAccess`.
        """
        from csi.pools.access import AttachedAccess  # that module imports this one

        return AttachedAccess(self, volume_id)


class PoolWrapper(Pool):
    """A pool that adds behaviour around another (``inner``) and forwards the rest.

    The wrapper takes the inner pool's name, options and capabilities (again after
    :meth:`start`, where a pool may learn them, e.g. lvmthin's extent size); subclasses
    override the calls they change.
    """

    def __init__(self, inner: Pool) -> None:
        super().__init__(inner.name, inner.options)
        self.inner = inner
        self._copy_capabilities()

    def _copy_capabilities(self) -> None:
        self.take_capabilities(self.inner)
        self.instance, self.state_dir = self.inner.instance, self.inner.state_dir

    def start(self) -> None:
        self.inner.start()
        self._copy_capabilities()

    def stop(self) -> None:
        self.inner.stop()

    def check(self) -> None:
        self.inner.check()

    def create_volume(self, req: VolumeRequest) -> Volume:
        return self.inner.create_volume(req)

    def delete_volume(self, volume_id: str) -> None:
        self.inner.delete_volume(volume_id)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        return self.inner.expand_volume(volume_id, size)

    def get_volume(self, volume_id: str) -> Volume | None:
        return self.inner.get_volume(volume_id)

    def find_volume(self, name: str) -> Volume | None:
        return self.inner.find_volume(name)

    def list_volumes(self) -> list[Volume]:
        return self.inner.list_volumes()

    def volume_condition(self, volume_id: str) -> Condition:
        return self.inner.volume_condition(volume_id)

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        return self.inner.create_snapshot(name, source_volume_id, parameters)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.inner.delete_snapshot(snapshot_id)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return self.inner.get_snapshot(snapshot_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return self.inner.find_snapshot(name)

    def list_snapshots(self) -> list[Snapshot]:
        return self.inner.list_snapshots()

    def snapshot_request(self, name: str, source_volume_id: str) -> Snapshot | Volume:
        return self.inner.snapshot_request(name, source_volume_id)

    def check_snapshot_parameters(self, parameters: dict[str, str]) -> None:
        self.inner.check_snapshot_parameters(parameters)

    def read_snapshot(self, snapshot_id: str) -> contextlib.AbstractContextManager[str]:
        return self.inner.read_snapshot(snapshot_id)

    def write_volume(self, volume_id: str) -> contextlib.AbstractContextManager[str]:
        return self.inner.write_volume(volume_id)

    def capacity(self) -> Capacity:
        return self.inner.capacity()

    def attach(self, volume_id: str) -> str:
        return self.inner.attach(volume_id)

    def detach(self, volume_id: str) -> None:
        self.inner.detach(volume_id)

    def mount_source(self, volume_id: str) -> str:
        return self.inner.mount_source(volume_id)

    def device_of(self, volume_id: str) -> str | None:
        return self.inner.device_of(volume_id)

    def refresh_device(self, volume_id: str) -> int:
        return self.inner.refresh_device(volume_id)

    def node_access(self, volume_id: str) -> Access:
        return self.inner.node_access(volume_id)


def check_compatible(existing: Volume, req: VolumeRequest) -> None:
    """Raise AlreadyExists unless ``existing`` satisfies a repeated CreateVolume ``req``."""
    required, limit = req.required, req.limit
    if existing.size < required or (limit and existing.size > limit):
        raise AlreadyExists(
            f"volume {req.name!r} exists with {existing.size} bytes, outside the requested "
            f"range [{required}, {limit or 'unlimited'}]"
        )
    if existing.source != req.source:
        raise AlreadyExists(
            f"volume {req.name!r} exists with a different content source "
            f"({existing.source} vs {req.source})"
        )
    if existing.parameters != req.parameters:
        raise AlreadyExists(f"volume {req.name!r} exists with different parameters")
    if req.fs_type and existing.fs_type and existing.fs_type != req.fs_type:
        raise AlreadyExists(
            f"volume {req.name!r} exists with fsType {existing.fs_type}, not {req.fs_type}"
        )


class Options:
    """Typed reading of a pool's options; :meth:`finish` rejects unknown keys."""

    def __init__(self, pool: str, options: dict[str, object]) -> None:
        self.pool = pool
        self.raw = dict(options)
        self.used: set[str] = {"name", "type"}

    def _get(self, key: str) -> object | None:
        self.used.add(key)
        return self.raw.get(key)

    def _bad(self, key: str, value: object, want: str) -> InvalidArgument:
        return InvalidArgument(f"pool {self.pool!r}: option {key}={value!r} must be {want}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self._get(key)
        if value is None:
            if default is None:
                raise InvalidArgument(f"pool {self.pool!r}: option {key!r} is required")
            return default
        if not isinstance(value, str) or not value:
            raise self._bad(key, value, "a non-empty string")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self._bad(key, value, "a non-empty string")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            low <= value <= high
        ):
            raise self._bad(key, value, f"a number from {low} to {high}")
        return float(value)

    def size(self, key: str, default: int | None) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self._bad(key, value, "a size such as 20Gi")
        size = parse_size(value)
        if size <= 0:
            raise self._bad(key, value, "a positive size such as 20Gi")
        return size

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise InvalidArgument(
                f"pool {self.pool!r}: unknown option(s) {', '.join(unknown)}; "
                "see the configuration reference in README.md"
            )
