"""The backup format against both target types: dedup, sparse restore, corruption,
resumed uploads, concurrent backups and garbage collection. No root needed."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from csi.backup import engine
from csi.backup.engine import CHUNK_SIZE, CorruptBackup, Manifest
from csi.backup.targets import Target
from csi.errors import Aborted, NotFound

MiB = 1 << 20


def make_image(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def backup(target: Target, img: Path, bid: str, source: str = "vol-a") -> engine.BackupStats:
    m = Manifest(id=bid, size=os.path.getsize(img), chunks=[], source_volume_id=source)
    return engine.backup_image(target, str(img), m, "test")


def test_full_and_incremental_backup_restore_sparse(target: Target, tmp_path: Path) -> None:
    size = 64 * MiB
    img = tmp_path / "a.img"
    make_image(img, size, [(0, os.urandom(3 * MiB)), (40 * MiB, os.urandom(MiB)),
                           (63 * MiB, b"\x01" * 4096)])
    first = backup(target, img, "pool:snap-1")
    assert first.chunks == 3 and first.uploaded_chunks == 3 and first.dedup_chunks == 0
    assert first.holes == 16 - 3
    # change 64 KiB inside one chunk: only that chunk goes up again
    with open(img, "r+b") as f:
        f.seek(41 * MiB)
        f.write(os.urandom(64 << 10))
    second = backup(target, img, "pool:snap-2")
    assert second.uploaded_chunks == 1 and second.dedup_chunks == 2
    assert second.uploaded_bytes <= CHUNK_SIZE + 1024
    # repeating a finished backup does nothing
    assert backup(target, img, "pool:snap-2").uploaded_chunks == 0

    m = engine.read_manifest(target, "pool:snap-2")
    out = tmp_path / "restored.img"
    engine.restore_to_file(target, m, str(out))
    assert sha(out) == sha(img)
    assert os.path.getsize(out) == size
    assert allocated(out) <= allocated(img) + MiB  # holes stay holes
    assert engine.verify(target, m) == []


def test_corrupt_or_missing_chunk_fails_restore_cleanly(target: Target, tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    make_image(img, 16 * MiB, [(0, os.urandom(9 * MiB))])
    backup(target, img, "pool:snap-c")
    m = engine.read_manifest(target, "pool:snap-c")
    _, digest, _ = m.chunks[1]
    key = engine.chunk_key(digest)
    good = target.get(key)
    target.put(key, good[:-10] + bytes(10))  # flip the tail
    out = tmp_path / "out.img"
    with pytest.raises(CorruptBackup, match=f"chunk {digest} is corrupt"):
        engine.restore_to_file(target, m, str(out))
    assert not out.exists() and list(tmp_path.glob("out.img*")) == []
    assert any(digest in p for p in engine.verify(target, m))
    target.delete(key)
    with pytest.raises(CorruptBackup, match=f"chunk {digest} is missing"):
        engine.restore_to_file(target, m, str(out))
    assert list(tmp_path.glob("out.img*")) == []
    # a tampered manifest is refused too
    raw = target.get(engine.manifest_key("pool:snap-c")).replace(b'"size": 16777216',
                                                                b'"size": 16777217')
    target.put(engine.manifest_key("pool:snap-c"), raw)
    with pytest.raises(CorruptBackup, match="manifest does not match"):
        engine.read_manifest(target, "pool:snap-c")
    with pytest.raises(NotFound):
        engine.read_manifest(target, "pool:snap-none")


def test_interrupted_upload_resumes(target: Target, tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    make_image(img, 40 * MiB, [(0, os.urandom(40 * MiB))])
    stop = threading.Event()
    done = 0
    lock = threading.Lock()

    def progress(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if done >= 16 * MiB:
                stop.set()

    m = Manifest(id="pool:snap-r", size=40 * MiB, chunks=[])
    with pytest.raises(Aborted):
        engine.backup_image(target, str(img), m, "test", progress=progress, workers=1,
                            interrupt=stop)
    assert not target.exists(engine.manifest_key("pool:snap-r"))
    uploaded = len(list(target.list("chunks/")))
    assert 0 < uploaded < 10
    resumed = backup(target, img, "pool:snap-r")
    assert resumed.dedup_chunks == uploaded
    assert resumed.uploaded_chunks == 10 - uploaded
    out = tmp_path / "out.img"
    engine.restore_to_file(target, engine.read_manifest(target, "pool:snap-r"), str(out))
    assert sha(out) == sha(img)


def test_concurrent_backups_and_garbage_collection(target: Target, tmp_path: Path) -> None:
    shared = os.urandom(8 * MiB)  # common to every volume: deduplicated
    images = []
    for i in range(4):
        img = tmp_path / f"v{i}.img"
        make_image(img, 24 * MiB, [(0, shared), (8 * MiB, os.urandom(8 * MiB))])
        images.append(img)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            backup(target, images[i], f"pool:snap-{i}", source=f"vol-{i}")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list(target.list("chunks/"))) == 2 + 4 * 2  # shared chunks stored once
    # deleting one backup frees only its own chunks
    engine.delete_backup(target, "pool:snap-0")
    result = engine.collect_garbage(target, "test")
    assert not result.deferred and result.deleted_chunks == 2
    for i in range(1, 4):
        m = engine.read_manifest(target, f"pool:snap-{i}")
        assert engine.verify(target, m) == []
    # a collector gives way to a running backup (its lease), and a backup waits for it
    with engine.backup_lease(target, "someone"):
        engine.delete_backup(target, "pool:snap-1")
        assert engine.collect_garbage(target, "test").deferred
    assert engine.collect_garbage(target, "test").deleted_chunks == 2
    assert list(target.list("locks/")) == []


def test_prune_selection() -> None:
    now = time.time()

    def m(i: int, vol: str, age: float) -> Manifest:
        return Manifest(id=f"p:snap-{i}", size=1, chunks=[], source_volume_id=vol,
                        created=now - age)

    ms = [m(1, "a", 300), m(2, "a", 200), m(3, "a", 100), m(4, "b", 5000)]
    assert {x.id for x in engine.select_prune(ms, 1, None, now)} == {"p:snap-1", "p:snap-2"}
    assert {x.id for x in engine.select_prune(ms, None, 250, now)} == {"p:snap-1",
                                                                        "p:snap-4"}
    assert {x.id for x in engine.select_prune(ms, 1, 250, now)} == {"p:snap-1"}
