"""Hostile input: property-based requests to every RPC. Only the codes the spec allows come
back (never INTERNAL or UNKNOWN), a rejected call changes nothing, and the driver keeps
serving."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi._proto import csi_pb2
from tests.helpers import (
    CSIClient,
    GiB,
    MiB,
    block_cap,
    loops_backed_by,
    mount_cap,
    mounts_under,
)
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root

C = grpc.StatusCode
EXAMPLES = int(os.environ.get("FLOTILLA_HOSTILE_EXAMPLES", "120"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

NASTY = ["", " ", ".", "..", "../", "../../etc/passwd", "/", "//", "a/b", "\0", "a\0b",
         "\n", "x" * 128, "x" * 129, "x" * 5000, "p:vol-" + "0" * 32, "p:snap-" + "0" * 32,
         "p:vol-../../x", "p:vol-" + "0" * 32 + "/..", "%2e%2e", "\u202e", "é" * 65,
         "-rf", "--help", "$(reboot)", "`id`", "*", "C:\\x"]

text = st.one_of(st.text(max_size=200), st.sampled_from(NASTY),
                 st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
sizes = st.one_of(st.integers(-(2**63), 2**63 - 1),
                  st.sampled_from([0, 1, -1, 4095, 300 * MiB, GiB, 2**50, 2**50 + 1, 2**62,
                                   2**63 - 1]))
params = st.dictionaries(st.one_of(text, st.sampled_from(["pool", "fsType",
                                                          "csi.storage.k8s.io/pvc/name"])),
                         st.one_of(text, st.sampled_from(["p", "ext4", "xfs", "btrfs"])),
                         max_size=3)


@st.composite
def capability(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability()
    kind = draw(st.sampled_from(["mount", "block", "none"]))
    if kind == "mount":
        cap.mount.fs_type = draw(st.one_of(st.sampled_from(["", "ext4", "xfs"]), text))
        cap.mount.mount_flags.extend(draw(st.lists(
            st.one_of(text, st.sampled_from(["ro", "noatime", "bind", "remount"])),
            max_size=3)))
    elif kind == "block":
        cap.block.SetInParent()
    if draw(st.booleans()):
        cap.access_mode.mode = draw(st.integers(0, 9))  # type: ignore[assignment]
    return cap


#: valid values mixed in, so that some calls get past the first checks
good_caps = st.sampled_from([mount_cap(), mount_cap("xfs"), mount_cap(mode=2), block_cap()])
caps_or_good = st.one_of(good_caps, capability())
good_names = st.sampled_from(["hostile-a", "hostile-b", "real"])


def capacity(required: int, limit: int) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


def state(rig: Rig) -> tuple[Any, ...]:
    files = sorted(str(p.relative_to(rig.fs)) for p in rig.fs.rglob("*"))
    roots = sorted(str(p.relative_to(rig.root)) for p in rig.root.rglob("*"))
    return (files, roots, mounts_under(str(rig.workdir)),
            sorted(loops_backed_by(str(rig.pool))))


@pytest.fixture
def live(rig: Rig) -> Iterator[tuple[CSIClient, Rig, dict[str, str]]]:
    """A driver with one volume (staged) and one snapshot, so ids can also be real."""
    c = rig.driver.start()
    vol = c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="real", volume_capabilities=[mount_cap()])).volume
    snap = c.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="real-snap", source_volume_id=vol.volume_id)).snapshot
    staging = rig.root / "staging"
    staging.mkdir()
    c.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging),
        volume_capability=mount_cap()))
    yield c, rig, {"vol": vol.volume_id, "snap": snap.snapshot_id, "staging": str(staging)}
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging)))
    assert c.identity.Probe(csi_pb2.ProbeRequest()).ready.value, "driver stopped serving"
    assert rig.driver.stop() == 0
    log = rig.driver.log.read_text()
    assert "Traceback" not in log, "an unexpected exception was logged"
    codes = Counter(" ".join(line.split()[4:6]) for line in log.splitlines()
                    if " INFO flotilla " in line)
    print(f"hostile calls by method and code: {dict(sorted(codes.items()))}")
    assert not any(k.endswith((" INTERNAL", " UNKNOWN")) for k in codes)


def check(rig: Rig, call: Callable[[], object], allowed: set[grpc.StatusCode],
          undo: Callable[[], object] | None = None) -> None:
    before = state(rig)
    try:
        call()
        code = C.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code in allowed, f"{code.name}: {err.details()}"
        assert err.details(), "an error without a message"
    if code != C.OK:
        assert state(rig) == before, f"a call rejected with {code.name} changed something"
    elif undo is not None:
        undo()


def ids(real: dict[str, str], key: str) -> st.SearchStrategy[str]:
    return st.one_of(text, st.just(real[key]))


# Each test draws whole requests; `real` ids and the staging path mix in valid values so
# that calls also get past the first checks.

def test_create_volume(live: tuple[CSIClient, Rig, dict[str, str]]) -> None:
    c, rig, real = live

    @SETTINGS
    @given(name=st.one_of(text, good_names), caps=st.lists(caps_or_good, max_size=2),
           p=st.one_of(params, st.just({})), req=st.one_of(sizes, st.just(0)),
           lim=st.one_of(sizes, st.just(0)),
           src=st.one_of(st.none(), st.tuples(st.sampled_from(["snapshot", "volume"]),
                                              st.one_of(text, st.sampled_from(
                                                  [real["snap"], real["vol"]])))))
    def run(name: str, caps: list[csi_pb2.VolumeCapability], p: dict[str, str], req: int,
            lim: int, src: tuple[str, str] | None) -> None:
        r = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=caps, parameters=p,
                                        capacity_range=capacity(req, lim))
        if src is not None:
            if src[0] == "snapshot":
                r.volume_content_source.snapshot.snapshot_id = src[1]
            else:
                r.volume_content_source.volume.volume_id = src[1]
        made: list[str] = []

        def call() -> None:
            made.append(c.controller.CreateVolume(r).volume.volume_id)

        def undo() -> None:
            if made[0] != real["vol"]:
                c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=made[0]))

        check(rig, call, {C.INVALID_ARGUMENT, C.OUT_OF_RANGE, C.ALREADY_EXISTS, C.NOT_FOUND,
                          C.RESOURCE_EXHAUSTED}, undo)

    run()


def test_controller_calls_on_ids(live: tuple[CSIClient, Rig, dict[str, str]]) -> None:
    c, rig, real = live
    ctl = c.controller

    @SETTINGS
    @given(vid=ids(real, "vol"), sid=ids(real, "snap"), name=text, p=params, req=sizes,
           lim=sizes, caps=st.lists(capability(), max_size=2), token=text,
           n=st.integers(-(2**31), 2**31 - 1))
    def run(vid: str, sid: str, name: str, p: dict[str, str], req: int, lim: int,
            caps: list[csi_pb2.VolumeCapability], token: str, n: int) -> None:
        IA, NF = C.INVALID_ARGUMENT, C.NOT_FOUND
        if vid != real["vol"]:  # never delete the fixture's volume
            check(rig, lambda: ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid)),
                  {IA, C.FAILED_PRECONDITION})
        if sid != real["snap"]:
            check(rig, lambda: ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
                snapshot_id=sid)), {IA, C.FAILED_PRECONDITION})
        made: list[str] = []

        def snap() -> None:
            made.append(ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name=name, source_volume_id=vid, parameters=p)).snapshot.snapshot_id)

        check(rig, snap, {IA, NF, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
              lambda: made[0] == real["snap"] or ctl.DeleteSnapshot(
                  csi_pb2.DeleteSnapshotRequest(snapshot_id=made[0])))
        check(rig, lambda: ctl.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vid, volume_capabilities=caps,
                                                      parameters=p)), {IA, NF})
        check(rig, lambda: ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=vid)), {IA, NF})
        check(rig, lambda: ctl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=sid)),
              {IA, NF})
        check(rig, lambda: ctl.ListVolumes(csi_pb2.ListVolumesRequest(
            max_entries=n, starting_token=token)), {IA, C.ABORTED})
        check(rig, lambda: ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            max_entries=n, starting_token=token, snapshot_id=sid, source_volume_id=vid)),
            {IA, C.ABORTED})
        check(rig, lambda: ctl.GetCapacity(csi_pb2.GetCapacityRequest(
            volume_capabilities=caps, parameters=p)), {IA})
        if vid != real["vol"] or req < 4 * GiB:  # keep the fixture's volume small
            check(rig, lambda: ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=capacity(req, lim))),
                {IA, NF, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED})

    run()


@pytest.fixture
def hazards(rig: Rig) -> Iterator[list[str]]:
    """Links (absolute, relative, dangling, a loop, into the staging path) and special
    files in the allowed root, and a directory beside the root that must never change."""
    outside = rig.workdir / "outside"
    outside.mkdir()
    (outside / "secret").write_text("untouched")
    pods = rig.root / "pods"
    pods.mkdir()
    for name, to in [("link-abs", str(outside)), ("link-rel", "../../outside"),
                     ("link-dangling", str(outside / "new")), ("link-loop", "link-loop2"),
                     ("link-loop2", "link-loop"), ("link-staging", str(rig.root / "staging")),
                     ("link-file", str(outside / "secret"))]:
        (pods / name).symlink_to(to)
    os.mkfifo(pods / "fifo")
    (pods / "file").write_text("")
    (pods / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(pods / "sock"))
    names = sorted(p.name for p in pods.iterdir())
    try:
        yield [str(pods / n) for n in names] + [str(pods / n / "x") for n in names] + \
            [f"/proc/1/root{pods}/dir", f"/proc/self/root{pods}/dir"]
    finally:
        sock.close()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "untouched"
    assert not mounts_under(str(outside))


def test_node_calls(live: tuple[CSIClient, Rig, dict[str, str]], hazards: list[str]) -> None:
    c, rig, real = live
    node = c.node
    inside = st.builds(lambda s: str(rig.root / "pods") + "/" + s, text)
    paths = st.one_of(text, inside, st.just(real["staging"]), st.sampled_from(hazards),
                      st.builds(lambda s: real["staging"] + "/" + s, st.sampled_from(
                          ["x", "lost+found", "a/b"])))

    @SETTINGS
    @given(vid=ids(real, "vol"), staging=paths, target=paths, cap=st.one_of(
        st.none(), caps_or_good), ro=st.booleans(), ctx=st.one_of(params, st.just({})),
        req=sizes)
    def run(vid: str, staging: str, target: str, cap: csi_pb2.VolumeCapability | None,
            ro: bool, ctx: dict[str, str], req: int) -> None:
        IA, NF, AE, FP = (C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS,
                          C.FAILED_PRECONDITION)
        stage_req = csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                   volume_context=ctx,
                                                   secrets={"token": "s3cr3t-hostile"})
        pub_req = csi_pb2.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                                   target_path=target, readonly=ro,
                                                   volume_context=ctx)
        if cap is not None:
            stage_req.volume_capability.CopyFrom(cap)
            pub_req.volume_capability.CopyFrom(cap)
        if staging != real["staging"]:
            check(rig, lambda: node.NodeStageVolume(stage_req), {IA, NF, AE, FP},
                  lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                      volume_id=vid, staging_target_path=staging)))
        check(rig, lambda: node.NodePublishVolume(pub_req), {IA, NF, AE, FP},
              lambda: node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                  volume_id=vid, target_path=target)))
        if target != real["staging"]:
            check(rig, lambda: node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vid, target_path=target)), {IA, NF, FP})
        check(rig, lambda: node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vid, volume_path=target)), {IA, NF})
        check(rig, lambda: node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=target, capacity_range=capacity(req, 0))),
            {IA, NF, C.OUT_OF_RANGE, FP})

    run()
    assert "s3cr3t-hostile" not in rig.driver.log.read_text()
    leftover = [p for p in Path(rig.root / "pods").rglob("*")] if (rig.root / "pods").exists() \
        else []
    assert all(not os.path.ismount(p) for p in leftover)
