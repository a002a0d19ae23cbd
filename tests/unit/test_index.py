"""The one object index and thin budget every pool type uses (csi/pools/index.py)."""

from __future__ import annotations

import threading

import pytest

from csi.errors import ResourceExhausted
from csi.pools.base import Snapshot, Volume
from csi.pools.index import Fill, ObjectIndex, ThinBudget, physical_fill

GiB = 1 << 30


def vol(uid: str, size: int, name: str = "") -> Volume:
    return Volume(id=f"p:vol-{uid}", name=name or uid, pool="p", size=size, created=1.0)


def budget(ratio: float = 1.0) -> ThinBudget:
    return ThinBudget(ObjectIndex(), "pool 'p'", ratio)


def test_index_finds_by_id_and_name_and_counts_provisioned_bytes() -> None:
    index = ObjectIndex()
    index.replace_all([vol("a", GiB), vol("b", 2 * GiB, "bee")],
                      [Snapshot(id="p:snap-s", name="s", pool="p",
                                source_volume_id="p:vol-a", size=GiB)])
    assert index.volume("p:vol-a") == vol("a", GiB)
    assert index.volume_named("bee") == vol("b", 2 * GiB, "bee")
    assert index.snapshot_named("s") is not None
    assert index.provisioned() == 3 * GiB  # snapshots take no provisioned bytes
    index.drop("p:vol-b")
    index.drop("p:snap-s")
    assert index.volume_named("bee") is None and index.snapshots() == []
    with index.mutex:
        assert index.counts_locked() == (1, 0)


def test_a_reservation_holds_its_bytes_until_released() -> None:
    b = budget()
    with b.reserve(4 * GiB, [], 3 * GiB):
        # a second create while the first is still building cannot pass the ratio
        with pytest.raises(ResourceExhausted,
                           match=r"pool 'p': provisioning 2147483648 more bytes would make "
                                 r"5368709120 provisioned, over overprovision_ratio=1 x"), \
                b.reserve(4 * GiB, [], 2 * GiB):
            pytest.fail("reserved past the ratio")
        assert b.state(4 * GiB, []).available == GiB
    assert b.state(4 * GiB, []).available == 4 * GiB


def test_concurrent_reservations_never_exceed_the_ratio() -> None:
    b = budget()
    inside, go = threading.Barrier(9), threading.Event()
    won: list[int] = []

    def create(i: int) -> None:
        try:
            with b.reserve(4 * GiB, [], GiB):
                won.append(i)
                inside.wait(timeout=10)
                go.wait(timeout=10)
        except ResourceExhausted:
            inside.wait(timeout=10)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    inside.wait(timeout=10)  # all eight have either reserved or been refused
    assert len(won) == 4
    go.set()
    for t in threads:
        t.join()
    assert b.state(4 * GiB, []).available == 4 * GiB


def test_fill_levels_refuse_everything_the_ratio_only_what_adds_bytes() -> None:
    b = budget()
    b.index.put(vol("a", 8 * GiB))  # over the ratio already (e.g. the admin lowered it)
    b.refuse(4 * GiB, [physical_fill(4 * GiB, GiB, 90.0)])  # a snapshot adds no bytes
    assert b.state(4 * GiB, []).available == 0
    full = [physical_fill(4 * GiB, 4 * GiB - 1, 90.0)]
    with pytest.raises(ResourceExhausted,
                       match=r"^pool 'p': physical space is 100\.0% used, at or over "
                             r"max_used_percent=90$"):
        b.refuse(4 * GiB, full)
    meta = [Fill("metadata space", 80.0, "max_metadata_percent", 80.0)]
    with pytest.raises(ResourceExhausted, match=r"metadata space is 80\.0% used"), \
            b.reserve(100 * GiB, meta, GiB):
        pytest.fail("reserved past a fill level")
    assert budget(10.0).state(4 * GiB, meta).available == 0
    assert physical_fill(0, 0, 90.0).percent == 100.0  # an empty filesystem has no room


def test_available_is_rounded_down_to_the_granularity() -> None:
    b = budget()
    b.index.put(vol("a", GiB + 1))
    assert b.state(4 * GiB, [], granularity=1 << 20).available == 3 * GiB - (1 << 20)
