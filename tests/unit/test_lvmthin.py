"""lvmthin pool logic against a fake ``lvm`` (no root, no device-mapper): the commands it
issues, the tags it writes and reads back, limits, errors and crash recovery. The real
thing runs in the VM tier (tests/vm/test_lvmthin_vm.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from csi.errors import (
    AlreadyExists,
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from csi.pools import build_pool
from csi.pools.base import Source, VolumeRequest
from csi.pools.lvmthin import LvmThinPool
from csi.system import System

MiB = 1 << 20
EXTENT = 4 * MiB


class FakeLvm(System):
    """A VG ``vg`` with thin pool ``tp`` (1 GiB data), kept as ``lvs`` report rows."""

    def __init__(self) -> None:
        super().__init__(sys_root="/nonexistent")
        self.rows: dict[str, dict[str, str]] = {
            "tp": {"lv_name": "tp", "lv_attr": "twi-aotz--", "lv_size": str(1 << 30),
                   "lv_tags": "", "pool_lv": "", "origin": "", "lv_active": "active",
                   "data_percent": "10.00", "metadata_percent": "5.00",
                   "lv_metadata_size": str(8 * MiB), "lv_health_status": ""},
            "other": {"lv_name": "other", "lv_attr": "-wi-a-----", "lv_size": str(EXTENT),
                      "lv_tags": "", "pool_lv": "", "origin": ""},
        }
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail: dict[str, str] = {}  # command -> stderr of a failure to inject

    def lvm(self, command: str, *args: str, timeout: float = 1.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append((command, args))
        if command in self.fail:
            raise CommandFailed(["lvm", command], 5, self.fail.pop(command))
        opts: dict[str, list[str]] = {}
        positional = []
        it = iter(args)
        for a in it:
            if a in ("--snapshot", "--ignoreactivationskip", "--force"):
                opts[a] = ["1"]
            elif a.startswith("--"):
                opts.setdefault(a, []).append(next(it))
            else:
                positional.append(a)
        target = positional[-1].split("/")[-1] if positional else ""
        if command == "lvcreate":
            name = opts["--name"][0]
            if "--snapshot" in opts:
                size, origin, pool = self.rows[target]["lv_size"], target, "tp"
            else:
                size, origin, pool = str(_bytes(opts["--virtualsize"][0])), "", "tp"
            self.rows[name] = {"lv_name": name, "lv_attr": "Vwi---tz--", "lv_size": size,
                               "lv_tags": ",".join(opts.get("--addtag", [])),
                               "pool_lv": pool, "origin": origin, "lv_active": ""}
        elif command == "lvextend":
            size = _bytes(opts["--size"][0])
            size = -(-size // EXTENT) * EXTENT
            if size <= int(self.rows[target]["lv_size"]):
                raise CommandFailed(["lvm", command], 5, "New size given (4 extents) not "
                                    "larger than existing size (4 extents)")
            self.rows[target]["lv_size"] = str(size)
        elif command == "lvchange":
            row = self.rows[target]
            tags = [t for t in row["lv_tags"].split(",") if t]
            tags = [t for t in tags if t not in opts.get("--deltag", [])]
            row["lv_tags"] = ",".join(tags + opts.get("--addtag", []))
            if "--activate" in opts:
                row["lv_active"] = "active" if opts["--activate"][0] == "y" else ""
        elif command == "lvremove":
            if target not in self.rows:
                raise CommandFailed(["lvm", command], 5, "Failed to find logical volume")
            del self.rows[target]
        return subprocess.CompletedProcess(["lvm", command], 0, "", "")

    def lvm_report(self, command: str, fields: Sequence[str], args: Sequence[str] = (),
                   timeout: float = 1.0) -> list[dict[str, str]]:
        self.calls.append((command, tuple(args)))
        if command == "vgs":
            return [{"vg_name": "vg", "vg_extent_size": str(EXTENT)}]
        return [dict(r) for r in self.rows.values()]

    def count(self, command: str) -> int:
        return sum(1 for c, _ in self.calls if c == command)


def _bytes(text: str) -> int:
    assert text.endswith("b"), text
    return int(text[:-1])


@pytest.fixture
def fake() -> FakeLvm:
    return FakeLvm()


def make(fake: FakeLvm, tmp_path: Path, **options: object) -> LvmThinPool:
    pool = build_pool({"name": "t", "type": "lvmthin", "volume_group": "vg",
                       "thin_pool": "tp", **options}, fake)
    assert isinstance(pool, LvmThinPool)
    pool.lock_dir = str(tmp_path)
    pool.start()
    return pool


def req(name: str, size: int, source: Source | None = None, **params: str) -> VolumeRequest:
    return VolumeRequest(name=name, size=size, required=size, limit=0, fs_type="ext4",
                         block=False, source=source, parameters=dict(params))


def test_options_are_checked(fake: FakeLvm) -> None:
    with pytest.raises(InvalidArgument, match="volume_group"):
        build_pool({"name": "t", "type": "lvmthin", "thin_pool": "tp"}, fake)
    with pytest.raises(InvalidArgument, match="not an LVM name"):
        build_pool({"name": "t", "type": "lvmthin", "volume_group": "-vg", "thin_pool": "tp"},
                   fake)
    with pytest.raises(InvalidArgument, match="unknown option"):
        build_pool({"name": "t", "type": "lvmthin", "volume_group": "vg", "thin_pool": "tp",
                    "max_used_percent": 90}, fake)
    with pytest.raises(InvalidArgument, match="max_data_percent"):
        build_pool({"name": "t", "type": "lvmthin", "volume_group": "vg", "thin_pool": "tp",
                    "max_data_percent": 0}, fake)


def test_start_needs_a_thin_pool(fake: FakeLvm, tmp_path: Path) -> None:
    del fake.rows["tp"]
    with pytest.raises(Unavailable, match="lvcreate --type thin-pool"):
        make(fake, tmp_path)


def test_one_process_per_thin_pool(fake: FakeLvm, tmp_path: Path) -> None:
    pool = make(fake, tmp_path)
    with pytest.raises(Unavailable, match="another flotilla process"):
        make(fake, tmp_path)
    pool.stop()
    make(fake, tmp_path).stop()


def test_lock_dir_is_an_option_created_when_missing(fake: FakeLvm, tmp_path: Path) -> None:
    spec = {"name": "t", "type": "lvmthin", "volume_group": "vg", "thin_pool": "tp"}
    pool = build_pool(spec, fake)
    assert isinstance(pool, LvmThinPool) and pool.lock_dir == "/run/lock/lvm"
    lock_dir = tmp_path / "run" / "lock" / "lvm"
    pool = build_pool({**spec, "lock_dir": str(lock_dir)}, fake)
    pool.start()
    try:
        assert (lock_dir / "flotilla-lvmthin-vg-tp.lock").is_file()
    finally:
        pool.stop()
    with pytest.raises(InvalidArgument, match="lock_dir"):
        build_pool({**spec, "lock_dir": ""}, fake)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(Unavailable, match="option lock_dir"):
        build_pool({**spec, "lock_dir": str(blocked / "lvm")}, fake).start()


def test_lifecycle_writes_tags_that_a_restart_reads_back(fake: FakeLvm,
                                                         tmp_path: Path) -> None:
    pool = make(fake, tmp_path)
    assert pool.granularity == EXTENT
    vol = pool.create_volume(req("naïve name/with:odd chars", 8 * EXTENT, fsType="xfs"))
    lv = pool.lv_name(vol.id)
    assert lv is not None and lv.startswith("fl-t-vol-") and lv in fake.rows
    assert fake.rows[lv]["lv_active"] == ""  # created inactive
    snap = pool.create_snapshot("s", vol.id, {})
    restored = pool.create_volume(req("big", 24 * EXTENT, Source("snapshot", snap.id)))
    assert fake.rows[pool.lv_name(restored.id)]["lv_size"] == str(24 * EXTENT)  # type: ignore[index]
    clone = pool.create_volume(req("clone", 8 * EXTENT, Source("volume", vol.id)))
    assert fake.rows[pool.lv_name(clone.id)]["origin"] == lv  # type: ignore[index]
    grown = pool.expand_volume(vol.id, 16 * EXTENT)
    assert grown.size == 16 * EXTENT
    pool.stop()

    again = make(fake, tmp_path)
    assert again.get_volume(vol.id) == grown
    assert again.get_volume(restored.id) == restored
    assert again.get_volume(clone.id) == clone
    assert again.get_snapshot(snap.id) == snap
    assert again.find_volume("naïve name/with:odd chars") == grown
    assert {v.name for v in again.list_volumes()} == {"naïve name/with:odd chars", "big",
                                                      "clone"}
    cap = again.capacity()
    assert cap.provisioned == (16 + 24 + 8) * EXTENT
    assert cap.volumes == 3 and cap.snapshots == 1
    assert cap.extra["flotilla_thinpool_data_percent"] == 10.0
    assert cap.extra["flotilla_thinpool_metadata_percent"] == 5.0


def test_idempotency_and_errors(fake: FakeLvm, tmp_path: Path) -> None:
    pool = make(fake, tmp_path)
    vol = pool.create_volume(req("v", 8 * EXTENT))
    creates = fake.count("lvcreate")
    assert pool.create_volume(req("v", 8 * EXTENT)).id == vol.id
    assert fake.count("lvcreate") == creates
    with pytest.raises(AlreadyExists):
        pool.create_volume(req("v", 16 * EXTENT))
    with pytest.raises(NotFound):
        pool.create_volume(req("r", 8 * EXTENT, Source("snapshot", f"t:snap-{'0' * 32}")))
    snap = pool.create_snapshot("s", vol.id, {})
    assert pool.create_snapshot("s", vol.id, {}).id == snap.id
    with pytest.raises(OutOfRange):
        pool.create_volume(req("small", 4 * EXTENT, Source("snapshot", snap.id)))
    other = pool.create_volume(req("w", 8 * EXTENT))
    with pytest.raises(AlreadyExists):
        pool.create_snapshot("s", other.id, {})
    pool.delete_volume(vol.id)
    pool.delete_volume(vol.id)
    assert pool.get_snapshot(snap.id) == snap  # snapshots outlive their origin
    pool.delete_snapshot(snap.id)
    pool.delete_snapshot(snap.id)
    pool.delete_snapshot("someone-else:snap-" + "0" * 32)
    assert "other" in fake.rows  # LVs that are not ours are never touched


def test_limits_are_refused_naming_the_limit(fake: FakeLvm, tmp_path: Path) -> None:
    pool = make(fake, tmp_path, overprovision_ratio=1.0)
    with pytest.raises(ResourceExhausted, match="overprovision_ratio=1"):
        pool.create_volume(req("huge", (1 << 30) + EXTENT))
    vol = pool.create_volume(req("fits", 8 * EXTENT))
    with pytest.raises(ResourceExhausted, match="overprovision_ratio"):
        pool.expand_volume(vol.id, 2 << 30)

    fake.rows["tp"]["data_percent"] = "91.50"
    pool = make(fake, tmp_path / "2")
    with pytest.raises(ResourceExhausted, match=r"data space is 91.5% used.*max_data_percent=90"):
        pool.create_volume(req("a", 8 * EXTENT))
    with pytest.raises(ResourceExhausted, match="max_data_percent"):
        pool.create_snapshot("s", vol.id, {})
    assert pool.capacity().available == 0

    fake.rows["tp"]["data_percent"] = "10.00"
    fake.rows["tp"]["metadata_percent"] = "80.00"
    pool = make(fake, tmp_path / "3")
    with pytest.raises(ResourceExhausted, match="max_metadata_percent=80"):
        pool.create_volume(req("b", 8 * EXTENT))

    fake.rows["tp"]["metadata_percent"] = "5.00"
    pool = make(fake, tmp_path / "4", max_data_percent=95)
    fake.fail["lvcreate"] = "Cannot create new thin volume, free space in thin pool vg/tp " \
                            "reached threshold."
    with pytest.raises(ResourceExhausted, match="has no room"):
        pool.create_volume(req("c", 8 * EXTENT))


def test_interrupted_growth_is_finished_at_start(fake: FakeLvm, tmp_path: Path) -> None:
    pool = make(fake, tmp_path)
    vol = pool.create_volume(req("v", 8 * EXTENT))
    fake.fail["lvextend"] = "Device or resource busy"
    with pytest.raises(CommandFailed):
        pool.expand_volume(vol.id, 16 * EXTENT)  # the size tag is written, lvextend failed
    lv = pool.lv_name(vol.id)
    assert lv is not None and fake.rows[lv]["lv_size"] == str(8 * EXTENT)
    assert pool.volume_condition(vol.id).abnormal
    pool.stop()
    again = make(fake, tmp_path)
    assert again.get_volume(vol.id).size == 16 * EXTENT  # type: ignore[union-attr]
    assert fake.rows[lv]["lv_size"] == str(16 * EXTENT)
    assert not again.volume_condition(vol.id).abnormal


def test_delete_of_an_open_volume_is_a_failed_precondition(fake: FakeLvm,
                                                           tmp_path: Path) -> None:
    pool = make(fake, tmp_path)
    vol = pool.create_volume(req("v", 8 * EXTENT))
    fake.fail["lvremove"] = "Logical volume vg/x in use."
    with pytest.raises(FailedPrecondition, match="unstage"):
        pool.delete_volume(vol.id)
    assert pool.get_volume(vol.id) is not None


def test_unreadable_tags_are_left_alone(fake: FakeLvm, tmp_path: Path) -> None:
    fake.rows["fl-t-vol-" + "a" * 32] = {
        "lv_name": "fl-t-vol-" + "a" * 32, "lv_attr": "Vwi---tz--", "lv_size": str(EXTENT),
        "lv_tags": "fl.v=1,fl.name=@@@", "pool_lv": "tp", "origin": ""}
    pool = make(fake, tmp_path)
    assert pool.list_volumes() == []
    assert "fl-t-vol-" + "a" * 32 in fake.rows
