"""The backup format and the operations on it: back up, restore, verify, collect, prune.

Layout in a target::

    chunks/<first 2 hex>/<sha256>   one chunk: b"FLC1", codec byte, payload
    manifests/<snapshot id>.json    {"manifest": {...}, "sha256": <of the manifest>}
    locks/<uuid>.json               leases that keep garbage collection off running backups

A volume is cut into fixed chunks (:data:`CHUNK_SIZE`) at fixed offsets. Only chunks that
hold allocated extents (``SEEK_DATA``/``SEEK_HOLE``) are read; a chunk that reads as zeros
is a hole and is not stored. A chunk is named by the SHA-256 of its content, compressed
with zstd when that makes it smaller, and uploaded only when the target does not have
it yet: a second backup of the same volume uploads only what changed, and an interrupted
backup re-run uploads only what is missing. The manifest is written last, so a backup
exists exactly when its manifest does.

Garbage collection deletes chunks no manifest references. It must never delete a chunk
that a running backup found already present (and so did not upload) but whose manifest
is not written yet: every backup holds a *shared* lease object while it runs, the
collector writes an *exclusive* one, and each looks at the others after writing its own.
A collector that sees a shared lease gives way (and is retried later); a backup that sees
an exclusive lease waits for it to go. Leases are refreshed while held and ignored once
older than :data:`LEASE_STALE_SECONDS` (a crashed holder).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard

from csi.backup.targets import MissingObject, Target
from csi.errors import Aborted, FailedPrecondition, Internal, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

FORMAT = "flotilla-backup/1"
CHUNK_SIZE = 4 << 20
MAGIC = b"FLC1"
RAW, ZSTD = 0, 1
ZERO_BLOCK = 64 << 10  # restores skip all-zero blocks of this size: holes stay holes
LEASE_REFRESH_SECONDS = 30.0
LEASE_STALE_SECONDS = 600.0
Progress = Callable[[int], None]  # called with bytes done since the last call

_ZEROS = bytes(CHUNK_SIZE)
#: tells this process's leases from those a crashed process of the same holder left
INSTANCE = uuid.uuid4().hex


class CorruptBackup(Internal):
    """A manifest or chunk does not match its hash, or is missing."""


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def manifest_key(backup_id: str) -> str:
    if "/" in backup_id or ".." in backup_id or not backup_id:
        raise InvalidArgument(f"bad backup id {backup_id!r}")
    return f"manifests/{backup_id}.json"


# ---- chunks ---------------------------------------------------------------------------

_tls = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "c", None)
    if c is None:
        c = _tls.c = zstandard.ZstdCompressor(level=3)
    return c


def encode_chunk(data: bytes) -> bytes:
    packed = _compressor().compress(data)
    if len(packed) < len(data):
        return MAGIC + bytes([ZSTD]) + packed
    return MAGIC + bytes([RAW]) + data


def decode_chunk(blob: bytes, digest: str, where: str) -> bytes:
    """The chunk's content, checked against ``digest``; CorruptBackup otherwise."""
    if blob[:4] != MAGIC or len(blob) < 5 or blob[4] not in (RAW, ZSTD):
        raise CorruptBackup(f"{where}: chunk {digest} is corrupt (bad header)")
    try:
        data = blob[5:] if blob[4] == RAW else \
            zstandard.ZstdDecompressor().decompress(blob[5:], max_output_size=CHUNK_SIZE)
    except zstandard.ZstdError as err:
        raise CorruptBackup(f"{where}: chunk {digest} is corrupt ({err})") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptBackup(f"{where}: chunk {digest} is corrupt (its content does not "
                            "match its SHA-256)")
    return data


# ---- manifests ------------------------------------------------------------------------

@dataclass
class Manifest:
    id: str  # the snapshot id: what CreateVolume names as the source
    size: int
    chunks: list[tuple[int, str, int]]  # (chunk index, sha256, stored bytes); no holes
    chunk_size: int = CHUNK_SIZE
    snapshot_name: str = ""
    source_volume_id: str = ""
    pool: str = ""
    pool_type: str = ""
    node: str = ""
    fs_type: str = ""
    created: float = field(default_factory=time.time)
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "size": self.size,
                "chunk_size": self.chunk_size, "snapshot_name": self.snapshot_name,
                "source_volume_id": self.source_volume_id, "pool": self.pool,
                "pool_type": self.pool_type, "node": self.node, "fs_type": self.fs_type,
                "created": self.created, "stats": self.stats,
                "chunks": [list(c) for c in self.chunks]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(id=d["id"], size=int(d["size"]), chunk_size=int(d["chunk_size"]),
                   chunks=[(int(i), str(h), int(n)) for i, h, n in d["chunks"]],
                   snapshot_name=d.get("snapshot_name", ""),
                   source_volume_id=d.get("source_volume_id", ""), pool=d.get("pool", ""),
                   pool_type=d.get("pool_type", ""), node=d.get("node", ""),
                   fs_type=d.get("fs_type", ""), created=float(d.get("created", 0)),
                   stats=dict(d.get("stats", {})))

    @property
    def stored_bytes(self) -> int:
        return sum(n for _, _, n in self.chunks)

    @property
    def data_bytes(self) -> int:
        return sum(min(self.chunk_size, self.size - i * self.chunk_size)
                   for i, _, _ in self.chunks)


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(target: Target, manifest: Manifest) -> None:
    body = manifest.to_json()
    blob = {"manifest": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    target.put(manifest_key(manifest.id), json.dumps(blob, sort_keys=True).encode())


def read_manifest(target: Target, backup_id: str) -> Manifest:
    """Raises NotFound (no such backup), CorruptBackup (hash mismatch), Unavailable."""
    try:
        raw = target.get(manifest_key(backup_id))
    except MissingObject:
        raise NotFound(f"backup {backup_id} does not exist in target {target.name!r}") \
            from None
    where = f"backup {backup_id} in target {target.name!r}"
    try:
        blob = json.loads(raw)
        body = blob["manifest"]
        ok = hashlib.sha256(_canonical(body)).hexdigest() == blob["sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptBackup(f"{where}: manifest is unreadable ({err})") from None
    if not ok:
        raise CorruptBackup(f"{where}: manifest does not match its SHA-256")
    if body.get("format") != FORMAT:
        raise CorruptBackup(f"{where}: unknown format {body.get('format')!r}")
    return Manifest.from_json(body)


def list_manifests(target: Target) -> list[Manifest]:
    out = []
    for info in target.list("manifests/"):
        if info.key.endswith(".json"):
            backup_id = info.key[len("manifests/"):-len(".json")]
            try:
                out.append(read_manifest(target, backup_id))
            except NotFound:
                continue  # deleted meanwhile
    return sorted(out, key=lambda m: m.created)


# ---- leases ---------------------------------------------------------------------------

class Lease:
    """A lease object in ``locks/`` refreshed by a thread while held (see module doc)."""

    def __init__(self, target: Target, kind: str, holder: str) -> None:
        self.target = target
        self.kind = kind
        self.key = f"locks/{uuid.uuid4().hex}.json"
        self.holder = holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.target.put(self.key, json.dumps({"kind": self.kind, "holder": self.holder,
                                              "instance": INSTANCE,
                                              "time": time.time()}).encode())

    def others(self) -> list[dict[str, Any]]:
        """Live leases other than this one."""
        out = []
        now = time.time()
        for info in self.target.list("locks/"):
            if info.key == self.key:
                continue
            try:
                body = json.loads(self.target.get(info.key))
            except (MissingObject, ValueError):
                continue
            if now - float(body.get("time", 0)) < LEASE_STALE_SECONDS:
                out.append(body)
        return out

    def __enter__(self) -> Lease:
        self._write()
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name=f"lease-{self.target.name}")
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_SECONDS):
            with contextlib.suppress(Unavailable):
                self._write()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Unavailable):
            self.target.delete(self.key)


def clear_dead_leases(target: Target, holder: str) -> int:
    """Remove the leases an earlier process of ``holder`` (this node) left by crashing:
    they would hold garbage collection off until they go stale."""
    removed = 0
    for info in list(target.list("locks/")):
        try:
            body = json.loads(target.get(info.key))
        except (MissingObject, ValueError):
            continue
        if body.get("holder") == holder and body.get("instance") != INSTANCE:
            target.delete(info.key)
            removed += 1
    return removed


@contextlib.contextmanager
def backup_lease(target: Target, holder: str, wait: float = 300.0) -> Iterator[Lease]:
    """A shared lease; waits while a collector holds an exclusive one."""
    with Lease(target, "shared", holder) as lease:
        deadline = time.monotonic() + wait
        while any(o.get("kind") == "exclusive" for o in lease.others()):
            if time.monotonic() > deadline:
                raise Unavailable(f"backup target {target.name!r}: garbage collection "
                                  f"has held it for over {wait:g}s; retry later")
            time.sleep(0.5)
        yield lease


# ---- reading a source -----------------------------------------------------------------

def data_chunks(fd: int, size: int, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """Indexes of the chunks that overlap allocated extents (all of them when the file
    cannot tell, e.g. a block device)."""
    every = list(range((size + chunk_size - 1) // chunk_size))
    indexes: set[int] = set()
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == 6:  # ENXIO: no data after offset
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            indexes.update(range(start // chunk_size, (end - 1) // chunk_size + 1))
            offset = end
    except OSError:
        return every
    return sorted(indexes)


@dataclass
class BackupStats:
    chunks: int = 0  # chunks with data
    holes: int = 0  # chunks skipped (unallocated or all zeros)
    uploaded_chunks: int = 0
    dedup_chunks: int = 0
    read_bytes: int = 0
    uploaded_bytes: int = 0
    seconds: float = 0.0


def backup_image(target: Target, path: str, manifest: Manifest, holder: str,
                 progress: Progress | None = None, workers: int = 4,
                 interrupt: threading.Event | None = None) -> BackupStats:
    """Back up the image or device at ``path`` (``manifest.size`` bytes) as ``manifest.id``.

    Idempotent: chunks already present are not uploaded again, and an existing manifest
    of the same id is kept (the backup is done). Raises Unavailable (target),
    FailedPrecondition (source unreadable), Aborted when ``interrupt`` is set.
    """
    stats = BackupStats()
    start = time.monotonic()
    key = manifest_key(manifest.id)
    if target.exists(key):
        return stats
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise FailedPrecondition(f"cannot read the snapshot at {path}: {err.strerror}") \
            from None
    size, cs = manifest.size, manifest.chunk_size
    lock = threading.Lock()
    seen: dict[str, int] = {}

    def one(index: int) -> tuple[int, str, int] | None:
        if interrupt is not None and interrupt.is_set():
            raise Aborted("backup interrupted")
        length = min(cs, size - index * cs)
        data = os.pread(fd, length, index * cs)
        if len(data) < length:
            data += bytes(length - len(data))
        with lock:
            stats.read_bytes += length
        if data == _ZEROS[:length]:
            with lock:
                stats.holes += 1
            if progress:
                progress(length)
            return None
        digest = hashlib.sha256(data).hexdigest()
        with lock:
            known = seen.get(digest)
        if known is None:
            if target.exists(chunk_key(digest)):
                blob_len = -1
                dedup = True
            else:
                blob = encode_chunk(data)
                target.put(chunk_key(digest), blob)
                blob_len = len(blob)
                dedup = False
            with lock:
                if dedup:
                    stats.dedup_chunks += 1
                else:
                    stats.uploaded_chunks += 1
                    stats.uploaded_bytes += blob_len
                seen[digest] = blob_len
        else:
            with lock:
                stats.dedup_chunks += 1
        if progress:
            progress(length)
        return index, digest, max(seen[digest], 0)

    try:
        indexes = data_chunks(fd, size, cs)
        stats.holes += (size + cs - 1) // cs - len(indexes)
        if progress:
            progress(size - sum(min(cs, size - i * cs) for i in indexes))
        with backup_lease(target, holder), \
                concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, indexes))
            chunks = [r for r in results if r is not None]
            stats.chunks = len(chunks)
            stats.seconds = time.monotonic() - start
            manifest.chunks = chunks
            manifest.stats = {"uploaded_bytes": stats.uploaded_bytes,
                              "uploaded_chunks": stats.uploaded_chunks,
                              "dedup_chunks": stats.dedup_chunks,
                              "read_bytes": stats.read_bytes, "seconds": stats.seconds}
            write_manifest(target, manifest)
    finally:
        os.close(fd)
    log.info("backup %s to %s: %d data chunks, %d uploaded (%d bytes), %d already there, "
             "%.1fs", manifest.id, target.name, stats.chunks, stats.uploaded_chunks,
             stats.uploaded_bytes, stats.dedup_chunks, stats.seconds)
    return stats


# ---- restore and verify ---------------------------------------------------------------

def _fetch(target: Target, manifest: Manifest, digest: str) -> bytes:
    where = f"backup {manifest.id} in target {target.name!r}"
    try:
        blob = target.get(chunk_key(digest))
    except MissingObject:
        raise CorruptBackup(f"{where}: chunk {digest} is missing") from None
    return decode_chunk(blob, digest, where)


def _write_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` leaving all-zero blocks unwritten (holes)."""
    view = memoryview(data)
    zero = _ZEROS[:ZERO_BLOCK]
    pos = 0
    while pos < len(data):
        block = view[pos:pos + ZERO_BLOCK]
        if block != zero[:len(block)]:
            os.pwrite(fd, block, offset + pos)
        pos += ZERO_BLOCK


def restore_to_fd(target: Target, manifest: Manifest, fd: int, fresh: bool,
                  progress: Progress | None = None, workers: int = 4) -> int:
    """Write the backup into ``fd``; returns bytes downloaded.

    ``fresh``: the destination reads as zeros (a new sparse file or thin volume), so
    holes are skipped; otherwise hole chunks are written as zeros. Every chunk is checked
    against its hash before it is written; raises CorruptBackup on the first bad one.
    """
    cs = manifest.chunk_size
    downloaded = 0
    lock = threading.Lock()
    data_idx = {i for i, _, _ in manifest.chunks}

    def one(entry: tuple[int, str, int]) -> None:
        nonlocal downloaded
        index, digest, stored = entry
        data = _fetch(target, manifest, digest)
        if fresh:
            _write_sparse(fd, data, index * cs)
        else:
            os.pwrite(fd, data, index * cs)
        with lock:
            downloaded += stored
        if progress:
            progress(len(data))

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, manifest.chunks))
    holes = [i for i in range((manifest.size + cs - 1) // cs) if i not in data_idx]
    for i in holes:
        length = min(cs, manifest.size - i * cs)
        if not fresh:
            os.pwrite(fd, _ZEROS[:length], i * cs)
        if progress:
            progress(length)
    os.fsync(fd)
    return downloaded


def restore_to_file(target: Target, manifest: Manifest, dest: str,
                    progress: Progress | None = None) -> int:
    """Restore into a new sparse file ``dest`` (built beside it, renamed when complete:
    a failed restore leaves nothing). Returns bytes downloaded."""
    if os.path.exists(dest):
        raise FailedPrecondition(f"{dest} exists; restore into a new file")
    tmp = f"{dest}.tmp-restore-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, manifest.size)
        n = restore_to_fd(target, manifest, fd, fresh=True, progress=progress)
        os.close(fd)
        fd = -1
        os.rename(tmp, dest)
        return n
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def verify(target: Target, manifest: Manifest, progress: Progress | None = None,
           workers: int = 4) -> list[str]:
    """Download and check every chunk; the problems found (empty: the backup is good)."""
    problems: list[str] = []
    lock = threading.Lock()

    def one(entry: tuple[int, str, int]) -> None:
        _index, digest, _ = entry
        try:
            data = _fetch(target, manifest, digest)
        except CorruptBackup as err:
            with lock:
                problems.append(str(err))
            return
        if progress:
            progress(len(data))

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, manifest.chunks))
    return problems


# ---- garbage collection and pruning ---------------------------------------------------

@dataclass
class GcResult:
    deferred: bool = False
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    kept_chunks: int = 0


def collect_garbage(target: Target, holder: str) -> GcResult:
    """Delete chunks no manifest references; deferred while a backup holds a lease."""
    with Lease(target, "exclusive", holder) as lease:
        if lease.others():
            return GcResult(deferred=True)
        referenced: set[str] = set()
        for m in list_manifests(target):
            referenced.update(h for _, h, _ in m.chunks)
        result = GcResult()
        for info in list(target.list("chunks/")):
            digest = info.key.rsplit("/", 1)[-1]
            if digest in referenced:
                result.kept_chunks += 1
                continue
            target.delete(info.key)
            result.deleted_chunks += 1
            result.deleted_bytes += info.size
    log.info("target %s: garbage collection deleted %d chunks (%d bytes), kept %d",
             target.name, result.deleted_chunks, result.deleted_bytes, result.kept_chunks)
    return result


def delete_backup(target: Target, backup_id: str) -> None:
    target.delete(manifest_key(backup_id))


def select_prune(manifests: list[Manifest], keep_last: int | None,
                 keep_within: float | None, now: float | None = None) -> list[Manifest]:
    """Backups to delete: per source volume, keep the newest ``keep_last`` and all those
    younger than ``keep_within`` seconds; a backup kept by either rule stays."""
    if keep_last is None and keep_within is None:
        raise InvalidArgument("prune needs --keep-last or --keep-within")
    now = time.time() if now is None else now
    groups: dict[str, list[Manifest]] = {}
    for m in manifests:
        groups.setdefault(m.source_volume_id or m.id, []).append(m)
    doomed = []
    for group in groups.values():
        group.sort(key=lambda m: m.created, reverse=True)
        for rank, m in enumerate(group):
            kept = (keep_last is not None and rank < keep_last) or \
                (keep_within is not None and now - m.created <= keep_within)
            if not kept:
                doomed.append(m)
    return doomed
