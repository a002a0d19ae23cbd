"""ControllerService over in-memory pools, no root: every refusal with its code and its
message, and the happy paths (create, idempotent create, incompatible re-create, delete,
expand, snapshots, lists, capacity, validation).

Two pools: ``local`` (a node-local :class:`MemoryPool`, block and mount, single-node
modes) and ``shared`` (a :class:`NetworkMemoryPool`: any node, multi-node modes, no raw
block). Calls go through :func:`tests.unit.fakes.call`, as the server's interceptor makes
them: a typed error becomes the status code of the one table in :mod:`csi.errors`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2
from csi.controller import ControllerService
from csi.errors import ResourceExhausted
from csi.locks import KeyedTryLock
from csi.pools import PoolSet
from csi.pools.base import new_id
from csi.validation import MAX_VOLUME_BYTES
from tests.unit.fakes import (
    RWX,
    GiB,
    MemoryPool,
    MiB,
    Mode,
    NetworkMemoryPool,
    call,
    cap,
    expect,
)

Code = grpc.StatusCode
NODE = "node-1"


def topology(node: str) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node})


@dataclass
class Ctl:
    svc: ControllerService
    local: MemoryPool
    shared: NetworkMemoryPool
    locks: KeyedTryLock
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def hold(self, key: str) -> None:
        """Keep ``key`` busy, as an operation in flight would, until the test ends."""
        self.held.enter_context(self.locks.hold(key))

    def create(self, name: str = "pvc-1", size: int = GiB, **kw: Any) -> csi_pb2.Volume:
        return call(self.svc.CreateVolume, create_req(name, size, **kw)).volume

    def snapshot(self, volume_id: str, name: str = "snap-1") -> csi_pb2.Snapshot:
        return call(self.svc.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=volume_id)).snapshot


def create_req(name: str = "pvc-1", size: int = GiB, limit: int = 0,
               caps: list[csi_pb2.VolumeCapability] | None = None,
               params: dict[str, str] | None = None, snapshot: str = "", volume: str = "",
               requisite: tuple[str, ...] = (), preferred: tuple[str, ...] = ()
               ) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[cap()] if caps is None else caps,
        parameters=params or {},
        capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit))
    if snapshot:
        req.volume_content_source.snapshot.snapshot_id = snapshot
    if volume:
        req.volume_content_source.volume.volume_id = volume
    if requisite or preferred:
        req.accessibility_requirements.requisite.extend(topology(n) for n in requisite)
        req.accessibility_requirements.preferred.extend(topology(n) for n in preferred)
    return req


@pytest.fixture
def ctl() -> Iterator[Ctl]:
    local, shared = MemoryPool("local"), NetworkMemoryPool("shared")
    locks = KeyedTryLock()
    c = Ctl(ControllerService(PoolSet([local, shared]), NODE, locks), local, shared, locks)
    with c.held:
        yield c


MISSING_VOL = new_id("local", "vol")
MISSING_SNAP = new_id("local", "snap")
Case = Callable[[Ctl], Any]  # builds the request (and any state it needs)


# ---- CreateVolume -----------------------------------------------------------------------


def _empty_source(c: Ctl) -> csi_pb2.CreateVolumeRequest:
    req = create_req()
    req.volume_content_source.SetInParent()
    return req


def _busy(key: str, req: Case) -> Case:
    def build(c: Ctl) -> Any:
        c.hold(key)
        return req(c)
    return build


def _refused_by_pool(c: Ctl) -> csi_pb2.CreateVolumeRequest:
    c.local.fail_create = ResourceExhausted(
        "pool 'local': provisioning 1073741824 more bytes would make 1073741824 "
        "provisioned, over overprovision_ratio=1 x 0 bytes = 0 bytes")
    return create_req()


CREATE_ERRORS = [
    pytest.param(lambda c: create_req(name=""), Code.INVALID_ARGUMENT,
                 r"^name is required$", id="no-name"),
    pytest.param(lambda c: create_req(name="x" * 129), Code.INVALID_ARGUMENT,
                 r"^name is 129 bytes; the limit is 128$", id="name-too-long"),
    pytest.param(lambda c: create_req(name="pvc\n1"), Code.INVALID_ARGUMENT,
                 r"^name contains a control character", id="name-control-character"),
    pytest.param(lambda c: create_req(caps=[]), Code.INVALID_ARGUMENT,
                 r"^volume_capabilities is required$", id="no-capabilities"),
    pytest.param(lambda c: create_req(caps=[cap(kind="none")]), Code.INVALID_ARGUMENT,
                 r"each capability needs access_type block or mount", id="no-access-type"),
    pytest.param(lambda c: create_req(caps=[cap(mode=Mode.UNKNOWN)]), Code.INVALID_ARGUMENT,
                 r"each capability needs an access_mode", id="no-access-mode"),
    pytest.param(lambda c: create_req(caps=[cap("block"), cap()]), Code.INVALID_ARGUMENT,
                 r"a volume is either block or mount, not both", id="block-and-mount"),
    pytest.param(lambda c: create_req(caps=[cap(fs_type="ext4"), cap(fs_type="xfs")]),
                 Code.INVALID_ARGUMENT, r"conflicting fs_type values \['ext4', 'xfs'\]",
                 id="two-fs-types"),
    pytest.param(lambda c: create_req(caps=[cap(fs_type="btrfs")]), Code.INVALID_ARGUMENT,
                 r"^fs_type 'btrfs' is not supported; use one of ext4, xfs$",
                 id="unsupported-fs-type"),
    pytest.param(lambda c: create_req(caps=[cap(flags=("noatime,bind",))]),
                 Code.INVALID_ARGUMENT, r"^mount flag 'bind' is not allowed: it changes what",
                 id="refused-mount-flag"),
    pytest.param(lambda c: create_req(params={"foo": "bar"}), Code.INVALID_ARGUMENT,
                 r"^unknown parameter 'foo'; accepted: pool, fsType$", id="unknown-parameter"),
    pytest.param(lambda c: create_req(params={"pool": "nope"}), Code.INVALID_ARGUMENT,
                 r"^parameter pool='nope' names no configured pool; configured: local, shared$",
                 id="unknown-pool"),
    pytest.param(lambda c: create_req(params={"fsType": "zfs"}), Code.INVALID_ARGUMENT,
                 r"^parameter fsType='zfs' is not supported; use one of xfs, ext4$",
                 id="unsupported-fsType-parameter"),
    pytest.param(lambda c: create_req(caps=[cap(fs_type="ext4")], params={"fsType": "xfs"}),
                 Code.INVALID_ARGUMENT,
                 r"^parameter fsType=xfs conflicts with the capability's fs_type=ext4$",
                 id="fsType-conflicts-with-capability"),
    pytest.param(lambda c: create_req(caps=[cap(mode=RWX)]), Code.INVALID_ARGUMENT,
                 r"^pool 'local' \(memory\) is node-local: it serves single-node access "
                 r"modes only$", id="multi-node-on-node-local-pool"),
    pytest.param(lambda c: create_req(caps=[cap("block")], params={"pool": "shared"}),
                 Code.INVALID_ARGUMENT,
                 r"^pool 'shared' \(memory-network\) serves filesystem volumes only, not raw "
                 r"block$", id="block-on-network-pool"),
    pytest.param(lambda c: create_req(size=-1), Code.OUT_OF_RANGE,
                 r"^capacity_range bytes must not be negative$", id="negative-size"),
    pytest.param(lambda c: create_req(size=MAX_VOLUME_BYTES + 1), Code.OUT_OF_RANGE,
                 r"asks for more than 1125899906842624 bytes \(1 PiB\)", id="over-1-PiB"),
    pytest.param(lambda c: create_req(size=2 * GiB, limit=GiB), Code.OUT_OF_RANGE,
                 r"^capacity_range required_bytes 2147483648 is above limit_bytes "
                 r"1073741824$", id="required-above-limit"),
    pytest.param(lambda c: create_req(size=0, limit=100 * MiB, caps=[cap(fs_type="xfs")]),
                 Code.OUT_OF_RANGE, r"^limit_bytes 104857600 is below 314572800 bytes, the "
                 r"smallest xfs volume$", id="limit-below-xfs-min"),
    pytest.param(lambda c: create_req(snapshot=MISSING_SNAP), Code.NOT_FOUND,
                 rf"^source snapshot {MISSING_SNAP} does not exist$", id="missing-snapshot"),
    pytest.param(lambda c: create_req(volume=MISSING_VOL), Code.NOT_FOUND,
                 rf"^source volume {MISSING_VOL} does not exist$", id="missing-volume"),
    pytest.param(lambda c: create_req(snapshot="local:snap/../x"), Code.INVALID_ARGUMENT,
                 r"^volume_content_source.snapshot.snapshot_id 'local:snap/../x' must not "
                 r"contain '/' or '..'$", id="source-id-with-slash"),
    pytest.param(_empty_source, Code.INVALID_ARGUMENT,
                 r"^volume_content_source needs a snapshot or a volume$",
                 id="empty-content-source"),
    pytest.param(lambda c: create_req("pvc-2", volume=c.create().volume_id,
                                      params={"pool": "shared"}),
                 Code.INVALID_ARGUMENT, r"^the content source lives in pool 'local'; it "
                 r"cannot seed a volume in pool 'shared'$", id="source-in-another-pool"),
    pytest.param(lambda c: create_req(requisite=("node-2",), preferred=("node-2",)),
                 Code.RESOURCE_EXHAUSTED,
                 rf"^no requisite topology includes {TOPOLOGY_KEY}=node-1, the only node "
                 "this controller provisions on$", id="requisite-elsewhere"),
    pytest.param(_busy("volume-name:pvc-1", lambda c: create_req()), Code.ABORTED,
                 r"^an operation on 'volume-name:pvc-1' is already in progress; retry later$",
                 id="name-busy"),
    pytest.param(lambda c: (create_req("pvc-2", volume=(v := c.create().volume_id)),
                            c.hold(v))[0],
                 Code.ABORTED, r"^an operation on 'local:vol-[0-9a-f]{32}' is already in "
                 "progress", id="source-busy"),
    pytest.param(lambda c: (c.create(), create_req(params={"pool": "shared"}))[1],
                 Code.ALREADY_EXISTS, r"^volume 'pvc-1' exists in pool 'local', not 'shared'$",
                 id="name-taken-in-another-pool"),
    pytest.param(lambda c: (c.create(), create_req(size=2 * GiB))[1], Code.ALREADY_EXISTS,
                 r"^volume 'pvc-1' exists with 1073741824 bytes, outside the requested range "
                 r"\[2147483648, unlimited\]$", id="re-create-larger"),
    pytest.param(lambda c: (c.create(size=2 * GiB), create_req(size=GiB, limit=GiB))[1],
                 Code.ALREADY_EXISTS, r"^volume 'pvc-1' exists with 2147483648 bytes, outside "
                 r"the requested range \[1073741824, 1073741824\]$", id="re-create-smaller"),
    pytest.param(lambda c: (c.create(), create_req(caps=[cap(fs_type="xfs")]))[1],
                 Code.ALREADY_EXISTS, r"^volume 'pvc-1' exists with fsType ext4, not xfs$",
                 id="re-create-other-fs-type"),
    pytest.param(lambda c: (c.create(params={"fsType": "ext4"}), create_req())[1],
                 Code.ALREADY_EXISTS, r"^volume 'pvc-1' exists with different parameters$",
                 id="re-create-other-parameters"),
    pytest.param(lambda c: (c.create(), c.create("pvc-src"),
                            create_req(volume=c.local.find_volume("pvc-src").id))[2],
                 Code.ALREADY_EXISTS, r"^volume 'pvc-1' exists with a different content "
                 r"source \(None vs Source\(kind='volume'", id="re-create-with-a-source"),
    pytest.param(_refused_by_pool, Code.RESOURCE_EXHAUSTED,
                 r"^pool 'local': provisioning 1073741824 more bytes .* over "
                 r"overprovision_ratio=1", id="pool-refuses"),
]


@pytest.mark.parametrize(("build", "code", "match"), CREATE_ERRORS)
def test_create_volume_refusals(ctl: Ctl, build: Case, code: Code, match: str) -> None:
    req = build(ctl)
    before = {p.name: dict(p.volumes) for p in (ctl.local, ctl.shared)}
    expect(code, match, ctl.svc.CreateVolume, req)
    after = {p.name: dict(p.volumes) for p in (ctl.local, ctl.shared)}
    assert after == before, "a refused CreateVolume creates nothing"


def test_create_volume_reply(ctl: Ctl) -> None:
    vol = ctl.create(params={"csi.storage.k8s.io/pvc/name": "data",
                             "csi.storage.k8s.io/pvc/namespace": "default"})
    assert re.fullmatch(r"local:vol-[0-9a-f]{32}", vol.volume_id)
    assert vol.capacity_bytes == GiB
    assert dict(vol.volume_context) == {"pool": "local", "fsType": "ext4"}
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPOLOGY_KEY: NODE}]
    assert not vol.HasField("content_source")
    stored = ctl.local.volumes[vol.volume_id]
    assert (stored.name, stored.size, stored.fs_type, stored.parameters) == \
        ("pvc-1", GiB, "ext4", {}), "Kubernetes' parameters are accepted and dropped"


@pytest.mark.parametrize(("required", "limit", "fs_type", "size"), [
    pytest.param(0, 0, "ext4", GiB, id="open-size-is-the-pool-default"),
    pytest.param(0, 512 * MiB, "ext4", 512 * MiB, id="open-size-within-the-limit"),
    pytest.param(1, 0, "ext4", MiB, id="rounded-to-the-granularity"),
    pytest.param(GiB + 1, 0, "ext4", GiB + MiB, id="rounded-up"),
    pytest.param(MiB, 0, "xfs", 300 * MiB, id="xfs-minimum"),
    pytest.param(MiB + 1, MiB + 100, "ext4", MiB + 100, id="unaligned-limit-is-kept"),
])
def test_create_volume_sizes(ctl: Ctl, required: int, limit: int, fs_type: str,
                             size: int) -> None:
    vol = ctl.create(size=required, limit=limit, caps=[cap(fs_type=fs_type)])
    assert vol.capacity_bytes == size
    assert vol.volume_context["fsType"] == fs_type


@pytest.mark.parametrize(("caps", "params", "fs_type"), [
    pytest.param([cap()], {}, "ext4", id="default-ext4"),
    pytest.param([cap(fs_type="xfs")], {}, "xfs", id="capability"),
    pytest.param([cap()], {"fsType": "xfs"}, "xfs", id="parameter"),
    pytest.param([cap(fs_type="xfs")], {"fsType": "xfs"}, "xfs", id="both-agree"),
    pytest.param([cap("block")], {}, "", id="block-has-none"),
    pytest.param([cap("block")], {"fsType": "zfs"}, "", id="block-ignores-fsType"),
])
def test_create_volume_fs_type(ctl: Ctl, caps: list[csi_pb2.VolumeCapability],
                               params: dict[str, str], fs_type: str) -> None:
    vol = ctl.create(caps=caps, params=params)
    assert vol.volume_context.get("fsType", "") == fs_type
    assert ctl.local.volumes[vol.volume_id].fs_type == fs_type


def test_create_volume_is_idempotent(ctl: Ctl) -> None:
    first = ctl.create()
    again = ctl.create()
    assert again == first
    within = ctl.create(size=GiB // 2, limit=2 * GiB)  # the range still holds 1 GiB
    assert within.volume_id == first.volume_id
    assert list(ctl.local.volumes) == [first.volume_id]


@pytest.mark.parametrize(("first", "again"), [
    pytest.param(cap("block"), cap(fs_type="xfs"), id="block-then-mount"),
    pytest.param(cap(fs_type="xfs"), cap("block"), id="mount-then-block"),
])
def test_re_create_with_another_access_type_returns_the_same_volume(
        ctl: Ctl, first: csi_pb2.VolumeCapability, again: csi_pb2.VolumeCapability) -> None:
    """Current behaviour, documented, and questionable: the access type is
    not part of CreateVolume's idempotency (check_compatible compares size, source,
    parameters and a filesystem both sides name), so block and mount requests of one name
    get the same volume, with the first request's fsType, rather than ALREADY_EXISTS."""
    vol = ctl.create(caps=[first])
    assert ctl.create(caps=[again]) == vol
    assert len(ctl.local.volumes) == 1


def test_create_volume_on_the_network_pool(ctl: Ctl) -> None:
    vol = ctl.create(caps=[cap(mode=RWX)], params={"pool": "shared"},
                     requisite=("node-2",))  # a shared pool is reachable from every node
    assert vol.volume_id.startswith("shared:vol-")
    assert not vol.accessible_topology, "no topology constraint on a shared pool"
    assert dict(vol.volume_context) == {"pool": "shared"}, "no mkfs: no fsType"


def test_create_volume_topology(ctl: Ctl) -> None:
    vol = ctl.create(requisite=("node-2", NODE), preferred=("node-2",))
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPOLOGY_KEY: NODE}]


def test_clone_and_restore(ctl: Ctl) -> None:
    origin = ctl.create("pvc-origin", size=2 * GiB)
    snap = ctl.snapshot(origin.volume_id)
    restored = ctl.create("pvc-restored", size=0, snapshot=snap.snapshot_id)
    assert restored.capacity_bytes == 2 * GiB, "an open size is the source's"
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    larger = ctl.create("pvc-larger", size=3 * GiB, snapshot=snap.snapshot_id)
    assert larger.capacity_bytes == 3 * GiB
    clone = ctl.create("pvc-clone", size=0, volume=origin.volume_id)
    assert clone.content_source.volume.volume_id == origin.volume_id
    assert clone.capacity_bytes == 2 * GiB
    assert clone.volume_id.startswith("local:"), "the source's pool when none is named"
    again = ctl.create("pvc-clone", size=0, volume=origin.volume_id)
    assert again.volume_id == clone.volume_id


def test_restore_smaller_than_the_source(ctl: Ctl) -> None:
    """The limit is checked against the source's size, and the message says so."""
    snap = ctl.snapshot(ctl.create("pvc-origin", size=2 * GiB).volume_id)
    expect(Code.OUT_OF_RANGE, r"^limit_bytes 1073741824 is below 2147483648 bytes, the "
           r"size of the source$", ctl.svc.CreateVolume,
           create_req("pvc-small", size=GiB, limit=GiB, snapshot=snap.snapshot_id))


# ---- DeleteVolume -----------------------------------------------------------------------


@pytest.mark.parametrize(("volume_id", "busy", "code", "match"), [
    pytest.param("", False, Code.INVALID_ARGUMENT, r"^volume_id is required$", id="no-id"),
    pytest.param("local:../x", False, Code.INVALID_ARGUMENT,
                 r"^volume_id 'local:../x' must not contain '/' or '..'$", id="dotdot"),
    pytest.param("x" * 129, False, Code.INVALID_ARGUMENT,
                 r"^volume_id is 129 bytes; the limit is 128$", id="too-long"),
    pytest.param(None, True, Code.ABORTED, r"^an operation on 'local:vol-[0-9a-f]{32}' is "
                 "already in progress; retry later$", id="busy"),
])
def test_delete_volume_refusals(ctl: Ctl, volume_id: str | None, busy: bool, code: Code,
                                match: str) -> None:
    vol = ctl.create()
    if busy:
        ctl.hold(vol.volume_id)
    expect(code, match, ctl.svc.DeleteVolume,
           csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id if volume_id is None
                                       else volume_id))
    assert vol.volume_id in ctl.local.volumes


def test_delete_volume(ctl: Ctl) -> None:
    vol = ctl.create()
    snap = ctl.snapshot(vol.volume_id)
    req = csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)
    assert call(ctl.svc.DeleteVolume, req) == csi_pb2.DeleteVolumeResponse()
    assert not ctl.local.volumes
    assert snap.snapshot_id in ctl.local.snapshots, "its snapshot stays"
    call(ctl.svc.DeleteVolume, req)  # gone already: OK
    for other in (MISSING_VOL, "pvc-not-ours", new_id("elsewhere", "vol")):
        call(ctl.svc.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=other))


# ---- ControllerExpandVolume -------------------------------------------------------------


def expand_req(volume_id: str, required: int = 2 * GiB, limit: int = 0,
               capability: csi_pb2.VolumeCapability | None = None
               ) -> csi_pb2.ControllerExpandVolumeRequest:
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit))
    if capability is not None:
        req.volume_capability.CopyFrom(capability)
    return req


EXPAND_ERRORS = [
    pytest.param(lambda c, v: csi_pb2.ControllerExpandVolumeRequest(volume_id=v),
                 Code.INVALID_ARGUMENT, r"^capacity_range is required$", id="no-range"),
    pytest.param(lambda c, v: expand_req(MISSING_VOL), Code.NOT_FOUND,
                 rf"^volume {MISSING_VOL} does not exist$", id="missing-volume"),
    pytest.param(lambda c, v: expand_req("a/b"), Code.INVALID_ARGUMENT,
                 r"^volume_id 'a/b' must not contain '/' or '..'$", id="bad-id"),
    pytest.param(lambda c, v: expand_req(v, required=-1), Code.OUT_OF_RANGE,
                 r"^capacity_range bytes must not be negative$", id="negative"),
    pytest.param(lambda c, v: expand_req(v, required=MAX_VOLUME_BYTES + 1),
                 Code.OUT_OF_RANGE, r"\(1 PiB\), the largest volume", id="over-1-PiB"),
    pytest.param(lambda c, v: expand_req(v, required=0, limit=GiB // 2), Code.OUT_OF_RANGE,
                 r"^limit_bytes 536870912 is below 1073741824 bytes, the volume's current "
                 r"size$", id="limit-below-current-size"),
    pytest.param(lambda c, v: expand_req(v, capability=cap(mode=RWX)), Code.INVALID_ARGUMENT,
                 r"^pool 'local' \(memory\) is node-local", id="multi-node-capability"),
    pytest.param(lambda c, v: expand_req(v, capability=cap(mode=Mode.UNKNOWN)),
                 Code.INVALID_ARGUMENT, r"^volume_capability: each capability needs an "
                 "access_mode$", id="malformed-capability"),
    pytest.param(lambda c, v: (c.hold(v), expand_req(v))[1], Code.ABORTED,
                 r"^an operation on 'local:vol-[0-9a-f]{32}' is already in progress",
                 id="busy"),
]


@pytest.mark.parametrize(("build", "code", "match"), EXPAND_ERRORS)
def test_expand_volume_refusals(ctl: Ctl, build: Callable[[Ctl, str], Any], code: Code,
                                match: str) -> None:
    vol = ctl.create()
    expect(code, match, ctl.svc.ControllerExpandVolume, build(ctl, vol.volume_id))
    assert ctl.local.volumes[vol.volume_id].size == GiB


@pytest.mark.parametrize(("pool", "required", "limit", "size", "node_expansion"), [
    pytest.param("local", 2 * GiB, 0, 2 * GiB, True, id="grow"),
    pytest.param("local", 2 * GiB + 1, 0, 2 * GiB + MiB, True, id="rounded-up"),
    pytest.param("local", GiB // 2, 0, GiB, True, id="smaller-is-a-no-op"),
    pytest.param("local", 0, 3 * GiB, GiB, True, id="limit-only-is-a-no-op"),
    pytest.param("shared", 2 * GiB, 0, 2 * GiB, False, id="network-pool-no-node-step"),
])
def test_expand_volume(ctl: Ctl, pool: str, required: int, limit: int, size: int,
                       node_expansion: bool) -> None:
    vol = ctl.create(params={"pool": pool})
    resp = call(ctl.svc.ControllerExpandVolume, expand_req(vol.volume_id, required, limit,
                                                           capability=cap()))
    assert resp.capacity_bytes == size
    assert resp.node_expansion_required is node_expansion
    target = ctl.local if pool == "local" else ctl.shared
    assert target.volumes[vol.volume_id].size == size


# ---- ValidateVolumeCapabilities ---------------------------------------------------------


def validate_req(volume_id: str, caps: list[csi_pb2.VolumeCapability] | None = None,
                 params: dict[str, str] | None = None
                 ) -> csi_pb2.ValidateVolumeCapabilitiesRequest:
    return csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=[cap()] if caps is None else caps,
        parameters=params or {}, volume_context={"pool": "local"})


@pytest.mark.parametrize(("build", "code", "match"), [
    pytest.param(lambda v: validate_req(MISSING_VOL), Code.NOT_FOUND,
                 rf"^volume {MISSING_VOL} does not exist$", id="missing-volume"),
    pytest.param(lambda v: validate_req(""), Code.INVALID_ARGUMENT,
                 r"^volume_id is required$", id="no-id"),
    pytest.param(lambda v: validate_req(v, caps=[]), Code.INVALID_ARGUMENT,
                 r"^volume_capabilities is required$", id="no-capabilities"),
    pytest.param(lambda v: validate_req(v, params={"color": "red"}), Code.INVALID_ARGUMENT,
                 r"^unknown parameter 'color'; accepted: pool, fsType$", id="unknown-param"),
])
def test_validate_refusals(ctl: Ctl, build: Callable[[str], Any], code: Code,
                           match: str) -> None:
    vol = ctl.create()
    expect(code, match, ctl.svc.ValidateVolumeCapabilities, build(vol.volume_id))


@pytest.mark.parametrize(("pool", "caps", "message"), [
    pytest.param("local", [cap()], "", id="same-capability"),
    pytest.param("local", [cap(fs_type="ext4", flags=("noatime",))], "", id="same-fs"),
    # current behaviour, questionable: a volume made for ext4 is confirmed for raw block
    pytest.param("local", [cap("block")], "", id="block-on-a-mount-volume"),
    pytest.param("local", [cap(fs_type="xfs")], "volume has fsType ext4, not xfs",
                 id="other-fs-type"),
    pytest.param("local", [cap(mode=RWX)], "pool 'local' (memory) is node-local: it serves "
                 "single-node access modes only", id="multi-node-on-node-local"),
    pytest.param("shared", [cap(mode=RWX)], "", id="multi-node-on-shared"),
    pytest.param("shared", [cap("block")], "pool 'shared' (memory-network) serves "
                 "filesystem volumes only, not raw block", id="block-on-shared"),
])
def test_validate(ctl: Ctl, pool: str, caps: list[csi_pb2.VolumeCapability],
                  message: str) -> None:
    vol = ctl.create(params={"pool": pool})
    req = validate_req(vol.volume_id, caps, params={"pool": pool})
    resp = call(ctl.svc.ValidateVolumeCapabilities, req)
    assert resp.message == message
    if message:
        assert not resp.HasField("confirmed")
    else:
        assert list(resp.confirmed.volume_capabilities) == caps
        assert dict(resp.confirmed.parameters) == {"pool": pool}
        assert dict(resp.confirmed.volume_context) == {"pool": "local"}


# ---- ListVolumes, ControllerGetVolume ---------------------------------------------------


def test_list_volumes_pages(ctl: Ctl) -> None:
    ids = sorted(ctl.create(f"pvc-{i}", params={"pool": p}).volume_id
                 for i, p in enumerate(("local", "shared", "local", "local", "shared")))
    first = call(ctl.svc.ListVolumes, csi_pb2.ListVolumesRequest(max_entries=2))
    assert [e.volume.volume_id for e in first.entries] == ids[:2]
    assert first.next_token == ids[1], "the token is the last id returned"
    assert all(not e.status.volume_condition.abnormal for e in first.entries)
    assert all(e.status.volume_condition.message == "ok" for e in first.entries)
    for vid in ids[:3]:  # deleting between pages is safe
        call(ctl.svc.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
    rest = call(ctl.svc.ListVolumes, csi_pb2.ListVolumesRequest(
        max_entries=2, starting_token=first.next_token))
    assert [e.volume.volume_id for e in rest.entries] == ids[3:]
    assert rest.next_token == "", "no token when nothing follows"
    everything = call(ctl.svc.ListVolumes, csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in everything.entries] == ids[3:]
    assert everything.next_token == ""


@pytest.mark.parametrize(("req", "code", "match"), [
    pytest.param(csi_pb2.ListVolumesRequest(starting_token="page-2"), Code.ABORTED,
                 r"^starting_token 'page-2' was not issued by this driver$", id="bad-token"),
    pytest.param(csi_pb2.ListVolumesRequest(max_entries=-1), Code.INVALID_ARGUMENT,
                 r"^max_entries must not be negative$", id="negative-max"),
])
def test_list_volumes_refusals(ctl: Ctl, req: csi_pb2.ListVolumesRequest, code: Code,
                               match: str) -> None:
    ctl.create()
    expect(code, match, ctl.svc.ListVolumes, req)


def test_controller_get_volume(ctl: Ctl) -> None:
    vol = ctl.create(size=0, snapshot=ctl.snapshot(ctl.create("pvc-0").volume_id).snapshot_id)
    resp = call(ctl.svc.ControllerGetVolume,
                csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert resp.volume == vol
    assert not resp.status.volume_condition.abnormal
    assert resp.status.volume_condition.message == "ok"
    expect(Code.NOT_FOUND, rf"^volume {MISSING_VOL} does not exist$",
           ctl.svc.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id=MISSING_VOL))
    expect(Code.INVALID_ARGUMENT, r"^volume_id is required$", ctl.svc.ControllerGetVolume,
           csi_pb2.ControllerGetVolumeRequest())


# ---- GetCapacity ------------------------------------------------------------------------


def capacity_req(pool: str = "", caps: list[csi_pb2.VolumeCapability] | None = None,
                 node: str | None = None, **params: str) -> csi_pb2.GetCapacityRequest:
    req = csi_pb2.GetCapacityRequest(volume_capabilities=caps or [],
                                     parameters={**({"pool": pool} if pool else {}), **params})
    if node is not None:
        req.accessible_topology.CopyFrom(topology(node))
    return req


@pytest.mark.parametrize(("req", "available"), [
    pytest.param(capacity_req(), 99 * GiB, id="default-pool"),
    pytest.param(capacity_req("local", [cap()], NODE), 99 * GiB, id="this-node"),
    pytest.param(capacity_req("local", node="node-2"), 0, id="another-node"),
    pytest.param(capacity_req("shared", node="node-2"), 100 * GiB, id="shared-any-node"),
    pytest.param(capacity_req("local", [cap("block")]), 99 * GiB, id="block-local"),
    pytest.param(capacity_req("shared", [cap("block")]), 0, id="block-shared"),
    pytest.param(capacity_req("local", [cap(mode=RWX)]), 0, id="multi-node-local"),
    pytest.param(capacity_req("local", [cap(mode=Mode.UNKNOWN)]), 0,
                 id="malformed-capability-is-0"),
    pytest.param(capacity_req(**{"csi.storage.k8s.io/fstype": "ext4"}), 99 * GiB,
                 id="kubernetes-parameters"),
])
def test_get_capacity(ctl: Ctl, req: csi_pb2.GetCapacityRequest, available: int) -> None:
    ctl.create()  # 1 GiB of the local pool's 100 provisioned
    resp = call(ctl.svc.GetCapacity, req)
    assert resp.available_capacity == available
    if available:
        assert resp.maximum_volume_size.value == available
        assert resp.minimum_volume_size.value == MiB
    else:
        assert not resp.HasField("maximum_volume_size")


@pytest.mark.parametrize(("req", "match"), [
    pytest.param(capacity_req("nope"), r"^parameter pool='nope' names no configured pool; "
                 "configured: local, shared$", id="unknown-pool"),
    pytest.param(capacity_req(size="1Gi"), r"^unknown parameter 'size'; accepted: pool, "
                 "fsType$", id="unknown-parameter"),
])
def test_get_capacity_refusals(ctl: Ctl, req: csi_pb2.GetCapacityRequest, match: str) -> None:
    expect(Code.INVALID_ARGUMENT, match, ctl.svc.GetCapacity, req)


# ---- snapshots --------------------------------------------------------------------------


def snap_req(name: str = "snap-1", source: str = "", **params: str
             ) -> csi_pb2.CreateSnapshotRequest:
    return csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source, parameters=params)


SNAPSHOT_ERRORS = [
    pytest.param(lambda c, v: snap_req("", v), Code.INVALID_ARGUMENT, r"^name is required$",
                 id="no-name"),
    pytest.param(lambda c, v: snap_req(source=""), Code.INVALID_ARGUMENT,
                 r"^source_volume_id is required$", id="no-source"),
    pytest.param(lambda c, v: snap_req(source="../v"), Code.INVALID_ARGUMENT,
                 r"^source_volume_id '../v' must not contain '/' or '..'$", id="bad-source"),
    pytest.param(lambda c, v: snap_req(source=MISSING_VOL), Code.NOT_FOUND,
                 rf"^volume {MISSING_VOL} does not exist$", id="missing-source"),
    pytest.param(lambda c, v: snap_req(source="pvc-not-ours"), Code.NOT_FOUND,
                 r"^volume pvc-not-ours does not exist$", id="foreign-source"),
    pytest.param(lambda c, v: snap_req(source=v, retain="yes"), Code.INVALID_ARGUMENT,
                 r"^unknown parameter 'retain'; accepted: backupTarget$", id="unknown-param"),
    pytest.param(lambda c, v: snap_req(source=v, backupTarget="nas"), Code.INVALID_ARGUMENT,
                 r"^parameter backupTarget: no backup_targets are configured \(see "
                 r"docs/backups.md\)$", id="backup-without-targets"),
    pytest.param(lambda c, v: (c.snapshot(v), snap_req(source=c.create("pvc-2").volume_id))[1],
                 Code.ALREADY_EXISTS, r"^snapshot 'snap-1' exists for volume local:vol-\w+, "
                 r"not local:vol-\w+$", id="name-taken-by-another-source"),
    pytest.param(lambda c, v: (c.hold("snapshot-name:snap-1"), snap_req(source=v))[1],
                 Code.ABORTED, r"^an operation on 'snapshot-name:snap-1' is already in "
                 r"progress; retry later$", id="name-busy"),
    pytest.param(lambda c, v: (c.hold(v), snap_req(source=v))[1], Code.ABORTED,
                 r"^an operation on 'local:vol-\w+' is already in progress", id="source-busy"),
]


@pytest.mark.parametrize(("build", "code", "match"), SNAPSHOT_ERRORS)
def test_create_snapshot_refusals(ctl: Ctl, build: Callable[[Ctl, str], Any], code: Code,
                                  match: str) -> None:
    vol = ctl.create()
    req = build(ctl, vol.volume_id)
    before = set(ctl.local.snapshots)
    expect(code, match, ctl.svc.CreateSnapshot, req)
    assert set(ctl.local.snapshots) == before


def test_create_snapshot(ctl: Ctl) -> None:
    vol = ctl.create(size=2 * GiB)
    snap = ctl.snapshot(vol.volume_id)
    assert re.fullmatch(r"local:snap-[0-9a-f]{32}", snap.snapshot_id)
    assert snap.source_volume_id == vol.volume_id
    assert snap.size_bytes == 2 * GiB and snap.ready_to_use
    assert snap.creation_time.seconds > 0
    assert ctl.snapshot(vol.volume_id) == snap, "idempotent by name"
    assert len(ctl.local.snapshots) == 1
    got = call(ctl.svc.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert got.snapshot == snap


def test_list_snapshots(ctl: Ctl) -> None:
    a, b = ctl.create("pvc-a").volume_id, ctl.create("pvc-b").volume_id
    snaps = {name: ctl.snapshot(src, name).snapshot_id
             for name, src in (("s1", a), ("s2", a), ("s3", b))}
    ids = sorted(snaps.values())

    def listed(**kw: Any) -> tuple[list[str], str]:
        resp = call(ctl.svc.ListSnapshots, csi_pb2.ListSnapshotsRequest(**kw))
        return [e.snapshot.snapshot_id for e in resp.entries], resp.next_token

    assert listed() == (ids, "")
    assert listed(max_entries=2) == (ids[:2], ids[1])
    assert listed(max_entries=2, starting_token=ids[1]) == (ids[2:], "")
    assert listed(snapshot_id=snaps["s2"]) == ([snaps["s2"]], "")
    assert listed(source_volume_id=a) == (sorted([snaps["s1"], snaps["s2"]]), "")
    assert listed(source_volume_id=b, snapshot_id=snaps["s1"]) == ([], "")
    assert listed(snapshot_id=MISSING_SNAP) == ([], "")
    assert listed(snapshot_id="not-ours") == ([], "")


@pytest.mark.parametrize(("req", "code", "match"), [
    pytest.param(csi_pb2.ListSnapshotsRequest(starting_token="2"), Code.ABORTED,
                 r"^starting_token '2' was not issued by this driver$", id="bad-token"),
    pytest.param(csi_pb2.ListSnapshotsRequest(max_entries=-5), Code.INVALID_ARGUMENT,
                 r"^max_entries must not be negative$", id="negative-max"),
])
def test_list_snapshots_refusals(ctl: Ctl, req: csi_pb2.ListSnapshotsRequest, code: Code,
                                 match: str) -> None:
    expect(code, match, ctl.svc.ListSnapshots, req)


def test_delete_snapshot(ctl: Ctl) -> None:
    vol = ctl.create()
    snap = ctl.snapshot(vol.volume_id)
    restored = ctl.create("pvc-restored", snapshot=snap.snapshot_id)
    req = csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
    ctl.hold(snap.snapshot_id)
    expect(Code.ABORTED, rf"^an operation on '{snap.snapshot_id}' is already in progress",
           ctl.svc.DeleteSnapshot, req)
    ctl.held.close()
    assert call(ctl.svc.DeleteSnapshot, req) == csi_pb2.DeleteSnapshotResponse()
    assert not ctl.local.snapshots
    assert restored.volume_id in ctl.local.volumes, "a restored volume stays"
    call(ctl.svc.DeleteSnapshot, req)  # gone already: OK
    call(ctl.svc.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id="not-ours"))
    expect(Code.NOT_FOUND, rf"^snapshot {snap.snapshot_id} does not exist$",
           ctl.svc.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    for method, request in (
        (ctl.svc.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()),
        (ctl.svc.GetSnapshot, csi_pb2.GetSnapshotRequest()),
    ):
        expect(Code.INVALID_ARGUMENT, r"^snapshot_id is required$", method, request)


# ---- what is not served -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "req", "match"), [
    pytest.param("ControllerPublishVolume", csi_pb2.ControllerPublishVolumeRequest(),
                 r"^ControllerPublishVolume is not served: Flotilla volumes need no attach "
                 r"step \(PUBLISH_UNPUBLISH_VOLUME is not advertised\)$", id="publish"),
    pytest.param("ControllerUnpublishVolume", csi_pb2.ControllerUnpublishVolumeRequest(),
                 r"^ControllerUnpublishVolume is not served", id="unpublish"),
    pytest.param("ControllerModifyVolume", csi_pb2.ControllerModifyVolumeRequest(),
                 r"^ControllerModifyVolume is not served: Flotilla has no mutable volume "
                 r"parameters \(MODIFY_VOLUME is not advertised\)$", id="modify"),
])
def test_unimplemented(ctl: Ctl, method: str, req: Any, match: str) -> None:
    expect(Code.UNIMPLEMENTED, match, getattr(ctl.svc, method), req)


def test_capabilities(ctl: Ctl) -> None:
    resp = call(ctl.svc.ControllerGetCapabilities, csi_pb2.ControllerGetCapabilitiesRequest())
    Cap = csi_pb2.ControllerServiceCapability.RPC.Type
    assert {c.rpc.type for c in resp.capabilities} == {
        Cap.CREATE_DELETE_VOLUME, Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_VOLUMES,
        Cap.LIST_SNAPSHOTS, Cap.GET_CAPACITY, Cap.CLONE_VOLUME, Cap.EXPAND_VOLUME,
        Cap.GET_VOLUME, Cap.VOLUME_CONDITION}
