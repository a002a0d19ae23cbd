"""Backups through the CSI API of real ``flotilla`` processes on real pools, against the
S3 server: incremental size after a 1% change of 1 GiB, restore by a second driver (other
node id, other pool) with identical checksums, corrupt chunks, a backup interrupted by a
killed driver and resumed, concurrent backups, deletion down to an empty bucket."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi._proto import csi_pb2
from csi.backup import engine
from csi.backup.targets import S3Target
from tests.backup.conftest import ACCESS_KEY, SECRET_KEY, S3Server
from tests.conftest import require_root
from tests.helpers import CSIClient, DriverProcess, GiB, MiB, block_cap, loop_filesystem

pytestmark = pytest.mark.root
REPORT = Path("/var/tmp/flotilla-tests/backup-report.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One driver process (``--mode all``) with its own node id, pool and metrics port."""

    def __init__(self, workdir: Path, name: str, pool_path: Path, target: dict[str, Any],
                 env: dict[str, str]) -> None:
        base = workdir / name
        base.mkdir()
        self.pool_path = pool_path
        self.port = free_port()
        self.driver = DriverProcess(base, [{"name": name, "type": "filepool",
                                            "path": str(pool_path)}], node_id=f"node-{name}",
                                    extra_args=("--metrics-address",
                                                f"127.0.0.1:{self.port}"))
        self.driver.config.write_text(yaml.safe_dump({
            "pools": [{"name": name, "type": "filepool", "path": str(pool_path)}],
            "allowed_roots": [str(base)], "backup_targets": [target]}))
        self.driver.env = env
        self.c: CSIClient = self.driver.start()

    def restart(self) -> None:
        self.c = self.driver.start()

    def image(self, volume_id: str) -> Path:
        return self.pool_path / "volumes" / (volume_id.split("-", 1)[1] + ".img")

    def snapshot_image(self, snapshot_id: str) -> Path:
        return self.pool_path / "snapshots" / (snapshot_id.split("snap-", 1)[1] + ".img")

    def create(self, name: str, size: int, source: str = "") -> str:
        req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[block_cap()],
                                          capacity_range=csi_pb2.CapacityRange(
                                              required_bytes=size))
        if source:
            req.volume_content_source.snapshot.snapshot_id = source
        return str(self.c.controller.CreateVolume(req, timeout=600).volume.volume_id)

    def snapshot(self, name: str, volume_id: str, timeout: float = 300) -> tuple[str, bool]:
        """CreateSnapshot with the backup class until ready; (id, was it ready at once)."""
        req = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=volume_id,
                                            parameters={"backupTarget": "s3"})
        first = self.c.controller.CreateSnapshot(req).snapshot
        snap = first
        deadline = time.monotonic() + timeout
        while not snap.ready_to_use:
            assert time.monotonic() < deadline, f"snapshot {name} not ready in {timeout}s"
            time.sleep(0.2)
            snap = self.c.controller.CreateSnapshot(req).snapshot
            assert snap.snapshot_id == first.snapshot_id  # idempotent
        return str(snap.snapshot_id), bool(first.ready_to_use)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode()
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                                  re.MULTILINE))


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def write(path: Path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        while length:
            n = min(length, 8 * MiB)
            f.write(os.urandom(n))
            length -= n
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def two_nodes(workdir: Path, s3_server: S3Server) -> Iterator[tuple[Node, Node, S3Target]]:
    require_root()
    bucket = s3_server.new_bucket()
    spec = {**s3_server.spec("s3", bucket)}
    target = S3Target("s3", bucket=bucket, prefix="backups", endpoint=s3_server.endpoint,
                      access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    with loop_filesystem(workdir, "xfs", 6 * GiB, name="fs-a") as fa, \
            loop_filesystem(workdir, "xfs", 6 * GiB, name="fs-b") as fb:
        nodes: list[Node] = []
        try:
            nodes.append(Node(workdir, "a", fa / "pool", spec, s3_server.env))
            nodes.append(Node(workdir, "b", fb / "pool", spec, s3_server.env))
            yield nodes[0], nodes[1], target
        finally:
            for n in nodes:
                n.driver.stop()
            target.close()


def chunk_count(target: S3Target) -> int:
    return len(list(target.list("chunks/")))


def wait_collected(target: S3Target, timeout: float = 60) -> None:
    """Garbage collection runs in the background after a deletion."""
    deadline = time.monotonic() + timeout
    while chunk_count(target):
        assert time.monotonic() < deadline, f"{chunk_count(target)} chunks left"
        time.sleep(0.1)


def test_incremental_backup_and_restore_on_another_node(
        two_nodes: tuple[Node, Node, S3Target]) -> None:
    a, b, target = two_nodes
    vol = a.create("data", GiB)
    write(a.image(vol), 0, GiB)  # a full volume: every chunk holds data

    t0 = time.monotonic()
    s1, ready_at_once = a.snapshot("snap-1", vol)
    full_seconds = time.monotonic() - t0
    assert not ready_at_once  # ready_to_use=false until the upload finished
    full = engine.read_manifest(target, s1).stats
    assert full["uploaded_chunks"] == GiB // engine.CHUNK_SIZE
    up1 = a.metric("flotilla_backup_uploaded_bytes_total")
    assert up1 == full["uploaded_bytes"] >= GiB  # random data does not compress

    change = GiB // 100  # 1% of the volume, in one region (not chunk aligned)
    write(a.image(vol), 300 * MiB + 12345, change)
    s2, _ = a.snapshot("snap-2", vol)
    incr = engine.read_manifest(target, s2).stats
    uploaded = incr["uploaded_bytes"]
    # only the chunks the change touched went up: the change plus at most 2 chunk edges
    assert change <= uploaded <= change + 2 * engine.CHUNK_SIZE + 64 * 1024
    assert incr["dedup_chunks"] == GiB // engine.CHUNK_SIZE - incr["uploaded_chunks"]
    assert a.metric("flotilla_backup_chunks_deduplicated_total") == incr["dedup_chunks"]
    assert a.metric("flotilla_backup_last_success_timestamp_seconds") > 0

    # node b has neither the snapshot nor the volume: it restores from the target
    t0 = time.monotonic()
    restored = b.create("restored", GiB, source=s2)
    restore_seconds = time.monotonic() - t0
    assert restored.startswith("b:vol-")
    assert sha(b.image(restored)) == sha(a.snapshot_image(s2))
    assert b.metric("flotilla_restore_operations_total") == 1
    # idempotent: the same request returns the same volume
    assert b.create("restored", GiB, source=s2) == restored
    # a larger volume from the same backup keeps the data and the size asked for
    bigger = b.create("restored-big", 2 * GiB, source=s1)
    assert os.path.getsize(b.image(bigger)) == 2 * GiB
    with open(b.image(bigger), "rb") as f, open(a.snapshot_image(s1), "rb") as g:
        assert hashlib.sha256(f.read(GiB)).digest() == hashlib.sha256(g.read()).digest()

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({
        "volume_bytes": GiB, "changed_bytes": change,
        "full_uploaded_bytes": full["uploaded_bytes"], "full_seconds": round(full_seconds, 1),
        "incremental_uploaded_bytes": uploaded,
        "incremental_uploaded_chunks": incr["uploaded_chunks"],
        "restore_seconds_other_node": round(restore_seconds, 1),
        "restored_sha256": sha(b.image(restored))}, indent=1))
    print(REPORT.read_text())

    # deleting the snapshots removes the manifests and, with the last, every chunk
    for sid in (s1, s2):
        a.c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
        assert not target.exists(engine.manifest_key(sid))
    wait_collected(target)
    # b's volumes do not depend on the backup
    assert sha(b.image(restored)) != ""


def test_corrupt_chunk_fails_the_restore_and_leaves_nothing(
        two_nodes: tuple[Node, Node, S3Target]) -> None:
    a, b, target = two_nodes
    vol = a.create("data", 64 * MiB)
    write(a.image(vol), 0, 20 * MiB)
    sid, _ = a.snapshot("snap", vol)
    m = engine.read_manifest(target, sid)
    _, digest, _ = m.chunks[2]
    key = engine.chunk_key(digest)
    target.put(key, target.get(key)[:-1] + b"\x00")
    with pytest.raises(grpc.RpcError) as err:
        b.create("restored", 64 * MiB, source=sid)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert f"chunk {digest} is corrupt" in str(err.value.details())
    listed = b.c.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert list(listed.entries) == []
    assert os.listdir(b.pool_path / "volumes") == []
    assert os.listdir(b.pool_path / "tmp") == []
    # once the chunk is good again, the same request succeeds
    target.delete(key)
    with open(a.snapshot_image(sid), "rb") as f:
        f.seek(2 * engine.CHUNK_SIZE)
        target.put(key, engine.encode_chunk(f.read(engine.CHUNK_SIZE)))
    restored = b.create("restored", 64 * MiB, source=sid)
    assert sha(b.image(restored)) == sha(a.snapshot_image(sid))


def test_backup_interrupted_by_a_killed_driver_resumes(
        two_nodes: tuple[Node, Node, S3Target]) -> None:
    a, b, target = two_nodes
    vol = a.create("data", 512 * MiB)
    write(a.image(vol), 0, 512 * MiB)
    req = csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=vol,
                                        parameters={"backupTarget": "s3"})
    first = a.c.controller.CreateSnapshot(req).snapshot
    assert not first.ready_to_use
    deadline = time.monotonic() + 60
    while chunk_count(target) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    a.driver.kill()
    before = chunk_count(target)
    assert before < 128 and not target.exists(engine.manifest_key(first.snapshot_id))
    a.restart()
    sid, _ = a.snapshot("snap", vol)
    assert sid == first.snapshot_id
    stats = engine.read_manifest(target, sid).stats
    assert stats["dedup_chunks"] >= before - 4  # what was up before the kill stayed up
    assert stats["uploaded_chunks"] + stats["dedup_chunks"] == 128
    restored = b.create("restored", 512 * MiB, source=sid)
    assert sha(b.image(restored)) == sha(a.snapshot_image(sid))
    # the lease of the killed run was dropped by the restarted one: deletion collects
    assert list(target.list("locks/")) == []
    a.c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    wait_collected(target)


def test_concurrent_backups_of_several_volumes(two_nodes: tuple[Node, Node, S3Target]) -> None:
    a, b, target = two_nodes
    vols = [a.create(f"v{i}", 128 * MiB) for i in range(4)]
    for v in vols:
        write(a.image(v), 0, 64 * MiB)
    reqs = [csi_pb2.CreateSnapshotRequest(name=f"s{i}", source_volume_id=v,
                                          parameters={"backupTarget": "s3"})
            for i, v in enumerate(vols)]
    ids = [a.c.controller.CreateSnapshot(r).snapshot.snapshot_id for r in reqs]
    deadline = time.monotonic() + 300
    while not all(a.c.controller.CreateSnapshot(r).snapshot.ready_to_use for r in reqs):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for i, sid in enumerate(ids):
        restored = b.create(f"r{i}", 128 * MiB, source=sid)
        assert sha(b.image(restored)) == sha(a.snapshot_image(sid))
    # GetSnapshot / ListSnapshots report them ready
    listed = a.c.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    assert sorted(e.snapshot.snapshot_id for e in listed.entries if e.snapshot.ready_to_use) \
        == sorted(ids)
    for sid in ids:
        a.c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    wait_collected(target)
    # an unknown target is refused before anything is made
    with pytest.raises(grpc.RpcError) as err:
        a.c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="bad", source_volume_id=vols[0], parameters={"backupTarget": "nope"}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
