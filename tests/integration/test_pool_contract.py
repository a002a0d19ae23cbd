"""The pool contract: the same behaviour from every pool type, on real storage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import AlreadyExists, NotFound, OutOfRange, ResourceExhausted
from csi.pools.base import Pool, Source, VolumeRequest
from tests.conftest import require_root
from tests.helpers import REPO, MiB
from tests.integration.pool_harness import HARNESSES, PoolHarness, enabled_harnesses

pytestmark = pytest.mark.root

A = b"A" * MiB
B = b"B" * MiB


@pytest.fixture(params=enabled_harnesses())
def harness(request: pytest.FixtureRequest, workdir: Path) -> Iterator[PoolHarness]:
    require_root()
    h = HARNESSES[request.param](workdir)
    with h.setup():
        yield h


@pytest.fixture
def pool(harness: PoolHarness) -> Pool:
    return harness.make()


def req(name: str, size: int, source: Source | None = None, block: bool = False,
        **params: str) -> VolumeRequest:
    return VolumeRequest(name=name, size=size, required=size, limit=0, fs_type="",
                         block=block, source=source, parameters=dict(params))


def test_create_is_idempotent_by_name(pool: Pool, harness: PoolHarness) -> None:
    size = 16 * harness.unit
    first = pool.create_volume(req("v1", size))
    again = pool.create_volume(req("v1", size))
    assert again.id == first.id
    assert again.size == size
    assert [v.id for v in pool.list_volumes()] == [first.id]
    with pytest.raises(AlreadyExists):
        pool.create_volume(req("v1", size * 2))
    with pytest.raises(AlreadyExists):
        pool.create_volume(req("v1", size, parameters_differ="x"))
    assert pool.get_volume(first.id) == first
    assert pool.find_volume("v1") == first


def test_missing_sources_are_not_found(pool: Pool, harness: PoolHarness) -> None:
    size = 4 * harness.unit
    bogus_snap = f"{pool.name}:snap-{'0' * 32}"
    bogus_vol = f"{pool.name}:vol-{'0' * 32}"
    with pytest.raises(NotFound):
        pool.create_volume(req("r", size, Source("snapshot", bogus_snap)))
    with pytest.raises(NotFound):
        pool.create_volume(req("c", size, Source("volume", bogus_vol)))
    with pytest.raises(NotFound):
        pool.create_snapshot("s", bogus_vol, {})
    with pytest.raises(NotFound):
        pool.expand_volume(bogus_vol, size)
    assert pool.list_volumes() == [] and pool.list_snapshots() == []
    assert harness.leftovers() == []


def test_snapshot_keeps_data_after_origin_is_overwritten(pool: Pool,
                                                          harness: PoolHarness) -> None:
    size = 16 * harness.unit
    vol = pool.create_volume(req("origin", size))
    harness.write(pool, vol.id, 0, A)
    harness.write(pool, vol.id, size - MiB, A)
    snap = pool.create_snapshot("snap", vol.id, {})
    assert snap.size == size and snap.source_volume_id == vol.id and snap.ready
    assert pool.create_snapshot("snap", vol.id, {}).id == snap.id
    harness.write(pool, vol.id, 0, B)
    restored = pool.create_volume(req("restored", size, Source("snapshot", snap.id)))
    assert harness.read(pool, restored.id, 0, MiB) == A
    assert harness.read(pool, restored.id, size - MiB, MiB) == A
    assert harness.read(pool, vol.id, 0, MiB) == B


def test_snapshot_name_with_other_source_already_exists(pool: Pool,
                                                        harness: PoolHarness) -> None:
    v1 = pool.create_volume(req("v1", 4 * harness.unit))
    v2 = pool.create_volume(req("v2", 4 * harness.unit))
    pool.create_snapshot("s", v1.id, {})
    with pytest.raises(AlreadyExists):
        pool.create_snapshot("s", v2.id, {})


def test_restore_into_a_larger_volume(pool: Pool, harness: PoolHarness) -> None:
    size = 8 * harness.unit
    vol = pool.create_volume(req("small", size))
    harness.write(pool, vol.id, 0, A)
    snap = pool.create_snapshot("s", vol.id, {})
    big = pool.create_volume(req("big", size * 3, Source("snapshot", snap.id)))
    assert big.size == size * 3
    assert big.source == Source("snapshot", snap.id)
    assert pool.refresh_device(big.id) == size * 3
    assert harness.read(pool, big.id, 0, MiB) == A
    with pytest.raises(OutOfRange):
        pool.create_volume(req("tiny", size // 2, Source("snapshot", snap.id)))


def test_clone_is_independent(pool: Pool, harness: PoolHarness) -> None:
    size = 8 * harness.unit
    src = pool.create_volume(req("src", size))
    harness.write(pool, src.id, 0, A)
    clone = pool.create_volume(req("clone", size, Source("volume", src.id)))
    assert harness.read(pool, clone.id, 0, MiB) == A
    harness.write(pool, clone.id, 0, B)
    assert harness.read(pool, src.id, 0, MiB) == A
    assert harness.read(pool, clone.id, 0, MiB) == B


def test_expand(pool: Pool, harness: PoolHarness) -> None:
    size = 8 * harness.unit
    vol = pool.create_volume(req("grow", size))
    harness.write(pool, vol.id, 0, A)
    grown = pool.expand_volume(vol.id, size * 2)
    assert grown.size == size * 2
    assert pool.get_volume(vol.id).size == size * 2  # type: ignore[union-attr]
    assert pool.refresh_device(vol.id) == size * 2
    assert harness.read(pool, vol.id, 0, MiB) == A
    assert pool.expand_volume(vol.id, size).size == size * 2  # shrinking is a no-op
    assert pool.capacity().provisioned == size * 2


def test_delete_volume_with_live_snapshots(pool: Pool, harness: PoolHarness) -> None:
    size = 8 * harness.unit
    vol = pool.create_volume(req("doomed", size))
    harness.write(pool, vol.id, 0, A)
    snap = pool.create_snapshot("survivor", vol.id, {})
    pool.detach(vol.id)
    pool.delete_volume(vol.id)
    assert pool.get_volume(vol.id) is None
    pool.delete_volume(vol.id)  # already gone: fine
    restored = pool.create_volume(req("again", size, Source("snapshot", snap.id)))
    assert harness.read(pool, restored.id, 0, MiB) == A
    pool.detach(restored.id)
    pool.delete_snapshot(snap.id)
    pool.delete_snapshot(snap.id)
    assert pool.get_snapshot(snap.id) is None
    assert harness.read(pool, restored.id, 0, MiB) == A  # restores outlive snapshots


def test_capacity_accounting(pool: Pool, harness: PoolHarness) -> None:
    before = pool.capacity()
    v1 = pool.create_volume(req("a", 4 * harness.unit))
    pool.create_volume(req("b", 8 * harness.unit))
    pool.create_snapshot("s", v1.id, {})
    cap = pool.capacity()
    assert cap.provisioned == before.provisioned + 12 * harness.unit
    assert cap.volumes == before.volumes + 2
    assert cap.snapshots == before.snapshots + 1
    assert 0 < cap.used <= cap.size
    assert cap.available <= before.available


def test_overprovisioning_is_refused_naming_the_limit(harness: PoolHarness) -> None:
    pool = harness.make(overprovision_ratio=1.0)
    size = pool.capacity().size
    huge = (size // harness.unit + 1) * harness.unit
    with pytest.raises(ResourceExhausted, match="overprovision_ratio"):
        pool.create_volume(req("huge", huge))
    assert pool.list_volumes() == []
    assert harness.leftovers() == []
    fits = pool.create_volume(req("fits", 4 * harness.unit))
    assert fits.size == 4 * harness.unit


def test_restart_rebuilds_from_storage(pool: Pool, harness: PoolHarness) -> None:
    vol = pool.create_volume(req("keep", 8 * harness.unit))
    harness.write(pool, vol.id, 0, A)
    snap = pool.create_snapshot("keep-snap", vol.id, {})
    clone = pool.create_volume(req("keep-clone", 8 * harness.unit, Source("volume", vol.id)))
    harness.detach_all(pool)
    again = harness.restart(pool)
    assert {v.id for v in again.list_volumes()} == {vol.id, clone.id}
    assert again.get_volume(clone.id) == clone
    assert again.get_snapshot(snap.id) == snap
    assert again.find_volume("keep") == vol
    assert harness.read(again, vol.id, 0, MiB) == A


CHILD = """
import json, os, sys
from pathlib import Path
from csi.pools import build_pool
from csi.pools.base import Source, VolumeRequest
from csi.system import System
spec = json.loads(sys.argv[1])
system = System()
if os.environ.get("FLOTILLA_TEST_NFS_BIND"):  # the nfs-local harness's injected System
    import tests.integration.pool_harness  # registers the nfs harnesses first
    from tests.integration.nfs_harness import BindAsNfsSystem
    root, server = os.environ["FLOTILLA_TEST_NFS_BIND"].split("|")
    system = BindAsNfsSystem(Path(root), server)
pool = build_pool(spec, system)
pool.start()
print("started", flush=True)
i = 0
while True:
    v = pool.create_volume(VolumeRequest(name=f"v{i}", size=int(sys.argv[2]), required=0,
                                         limit=0, fs_type="", block=False))
    s = pool.create_snapshot(f"s{i}", v.id, {})
    pool.create_volume(VolumeRequest(name=f"r{i}", size=int(sys.argv[2]), required=0,
                                     limit=0, fs_type="", block=False,
                                     source=Source("snapshot", s.id)))
    if i % 2:
        pool.delete_volume(v.id)
        pool.delete_snapshot(s.id)
    pool.expand_volume(pool.find_volume(f"r{i}").id, 2 * int(sys.argv[2]))
    i += 1
"""


@pytest.mark.parametrize("seed", range(4))
def test_kill_at_a_random_moment_leaves_complete_objects(harness: PoolHarness,
                                                         seed: int) -> None:
    size = 4 * harness.unit
    spec = harness.spec()
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec), str(size)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **harness.child_env()})
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started"
        time.sleep(random.Random(seed).uniform(0.05, 0.6))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.stdout is not None
        child.stdout.close()
    pool = harness.make()
    assert harness.leftovers() == []
    for vol in pool.list_volumes():
        assert not pool.volume_condition(vol.id).abnormal, vol
    # retrying what may have been interrupted converges to one object per name
    n = len(pool.list_volumes())
    for vol in list(pool.list_volumes()):
        again = pool.create_volume(VolumeRequest(
            name=vol.name, size=vol.size, required=0, limit=0, fs_type="", block=False,
            source=vol.source))
        assert again.id == vol.id
    assert len(pool.list_volumes()) == n
    names = [v.name for v in pool.list_volumes()]
    assert len(names) == len(set(names))
