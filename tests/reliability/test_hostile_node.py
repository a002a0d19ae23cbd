"""Hostile input at the node boundary, class by class: links at every path argument,
special files, /proc paths, NUL and over-long components, undecodable bodies, RPCs the
driver does not serve, the stats/unpublish race, FIFO targets, cross-volume paths, nested
mounts, mount flags and log injection. Each case asserts the status code and its message,
that nothing outside the allowed root changed, and that the driver still serves."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi._proto import csi_pb2
from tests.helpers import CSIClient, GiB, block_cap, loops_backed_by, mount_cap, mounts_under
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.root

C = grpc.StatusCode
#: undecodable bodies sent per method in CI; `make test-hostile` sends more
UNDECODABLE_PER_METHOD = int(os.environ.get("FLOTILLA_HOSTILE_UNDECODABLE", "150"))


@dataclass
class Node:
    c: CSIClient
    rig: Rig
    vol: str  # staged and published (mount)
    other: str  # a second volume, staged and published (mount)
    blk: str  # a raw block volume, staged
    staging: Path
    target: Path
    other_staging: Path
    other_target: Path
    outside: Path  # a directory beside the allowed root, with a file in it

    @property
    def pods(self) -> Path:
        return self.rig.root / "pods"

    def outside_state(self) -> tuple[object, ...]:
        """Everything outside the allowed root that a request could reach."""
        files = sorted((str(p.relative_to(self.rig.workdir)), p.is_dir())
                       for p in self.outside.rglob("*"))
        secret = (self.outside / "secret").read_text()
        mounts = sorted(m for m in mounts_under(str(self.rig.workdir))
                        if not m.startswith(str(self.rig.root) + "/"))
        return files, secret, mounts

    def still_serves(self) -> None:
        assert self.c.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        stats = self.c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.vol, volume_path=str(self.target)))
        assert stats.usage[0].total > 0
        assert (self.target / "marker").read_text() == self.vol


def stage_req(vid: str, path: str | Path,
              cap: csi_pb2.VolumeCapability | None = None) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(path),
                                          volume_capability=cap or mount_cap())


def publish_req(vid: str, staging: str | Path, target: str | Path,
                cap: csi_pb2.VolumeCapability | None = None,
                readonly: bool = False) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap or mount_cap(), readonly=readonly)


@pytest.fixture
def node(rig: Rig) -> Iterator[Node]:
    c = rig.driver.start()
    outside = rig.workdir / "outside"
    outside.mkdir()
    (outside / "secret").write_text("untouched")
    pods = rig.root / "pods"
    pods.mkdir()

    def volume(name: str, cap: csi_pb2.VolumeCapability) -> str:
        return c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[cap],
            capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))).volume.volume_id

    vol, other, blk = volume("a", mount_cap()), volume("b", mount_cap()), \
        volume("blk", block_cap())
    staged = [(vol, rig.root / "staging-a", pods / "a"),
              (other, rig.root / "staging-b", pods / "b")]
    for vid, staging, target in staged:
        c.node.NodeStageVolume(stage_req(vid, staging))
        c.node.NodePublishVolume(publish_req(vid, staging, target))
        (target / "marker").write_text(vid)
    c.node.NodeStageVolume(stage_req(blk, rig.root / "staging-blk", block_cap()))
    n = Node(c, rig, vol, other, blk, *staged[0][1:], *staged[1][1:], outside)
    before = n.outside_state()
    yield n
    n.still_serves()
    assert n.outside_state() == before, "something outside the allowed root changed"
    for vid, staging, target in staged:
        c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=str(target)))
        c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(staging)))
    c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=blk, staging_target_path=str(rig.root / "staging-blk")))
    assert not mounts_under(str(rig.root)), "a mount was left in the allowed root"
    assert rig.driver.stop() == 0
    log = rig.driver.log.read_text()
    assert "Traceback" not in log, "an unexpected exception was logged"
    codes = Counter(line.split()[5] for line in log.splitlines()
                    if " INFO flotilla " in line and len(line.split()) > 5)
    assert not {"INTERNAL", "UNKNOWN"} & set(codes), codes


def refused(call: Callable[[], object], code: grpc.StatusCode, match: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
    assert match in err.details(), err.details()  # type: ignore[attr-defined]


def unchanged(n: Node, call: Callable[[], object], code: grpc.StatusCode, match: str) -> None:
    """The call is refused with ``code`` and a message containing ``match``, and neither
    the allowed root, the mounts, nor the pool's loop devices change."""
    def snapshot() -> tuple[object, ...]:
        files = sorted(str(p.relative_to(n.rig.root)) for p in n.rig.root.rglob("*")
                       if not str(p).startswith((str(n.target) + "/",
                                                 str(n.other_target) + "/",
                                                 str(n.staging) + "/",
                                                 str(n.other_staging) + "/")))
        return (files, mounts_under(str(n.rig.workdir)),
                sorted(loops_backed_by(str(n.rig.pool))))

    before = snapshot()
    refused(call, code, match)
    assert snapshot() == before, "a refused call changed something"


# ---- links at every path argument -----------------------------------------------------

LINKS = {
    "absolute": lambda n: str(n.outside),
    "relative": lambda n: "../../outside",
    "dangling": lambda n: str(n.outside / "created-by-the-driver"),
    "loop": lambda n: "loop-b",
    "to-staging": lambda n: str(n.staging),
}


@pytest.fixture(params=sorted(LINKS))
def link(request: pytest.FixtureRequest, node: Node) -> Path:
    """A link in the pods directory (the kind a pod's writable volume could hold)."""
    where = node.pods / "uid" / "link"
    where.parent.mkdir()
    where.symlink_to(LINKS[request.param](node))
    if request.param == "loop":
        (where.parent / "loop-b").symlink_to("link")
    return where


def test_a_link_as_staging_path_is_refused(node: Node, link: Path) -> None:
    unchanged(node, lambda: node.c.node.NodeStageVolume(stage_req(node.other, link)),
              C.INVALID_ARGUMENT, "is a symbolic link")
    unchanged(node, lambda: node.c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=node.vol, staging_target_path=str(link))),
        C.FAILED_PRECONDITION, "still published")


def test_a_link_as_target_path_is_refused(node: Node, link: Path) -> None:
    unchanged(node, lambda: node.c.node.NodePublishVolume(
        publish_req(node.vol, node.staging, link)), C.INVALID_ARGUMENT, "is a symbolic link")
    unchanged(node, lambda: node.c.node.NodePublishVolume(
        publish_req(node.blk, node.rig.root / "staging-blk", link, block_cap())),
        C.INVALID_ARGUMENT, "is a symbolic link")
    # unpublish removes the link itself, never what it points to, and unmounts nothing
    node.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=node.vol, target_path=str(link)))
    assert not os.path.lexists(link)


def test_a_link_as_volume_path_is_not_the_volume(node: Node, link: Path) -> None:
    for call in (node.c.node.NodeGetVolumeStats, node.c.node.NodeExpandVolume):
        req_type = csi_pb2.NodeGetVolumeStatsRequest if call == node.c.node.NodeGetVolumeStats \
            else csi_pb2.NodeExpandVolumeRequest
        unchanged(node, lambda call=call, req_type=req_type: call(req_type(  # type: ignore[misc]
            volume_id=node.vol, volume_path=str(link))), C.NOT_FOUND, "is not available at")


@pytest.mark.parametrize("arg", ["staging_target_path", "target_path"])
def test_a_link_on_the_way_is_refused(node: Node, arg: str) -> None:
    way = node.pods / "uid"
    way.symlink_to(node.outside)
    path = way / "volumes" / "mount"

    def call() -> object:
        if arg == "staging_target_path":
            return node.c.node.NodeStageVolume(stage_req(node.other, path))
        return node.c.node.NodePublishVolume(publish_req(node.vol, node.staging, path))

    unchanged(node, call, C.INVALID_ARGUMENT, "passes through the symbolic link")
    # a raw block stage does not use its staging path, but checks it as unstage does
    unchanged(node, lambda: node.c.node.NodeStageVolume(
        stage_req(node.blk, path, block_cap())), C.INVALID_ARGUMENT,
        "passes through the symbolic link")
    unchanged(node, lambda: node.c.node.NodePublishVolume(
        publish_req(node.vol, path, node.pods / "t")), C.INVALID_ARGUMENT,
        "passes through the symbolic link")


# ---- special files, /proc, NUL, long components ------------------------------------------

@pytest.fixture
def specials(node: Node) -> Iterator[dict[str, Path]]:
    d = node.pods / "special"
    d.mkdir()
    (d / "file").write_text("")
    os.mkfifo(d / "fifo")
    (d / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    try:
        yield {p.name: p for p in d.iterdir()}
    finally:
        sock.close()


@pytest.mark.parametrize(("kind", "message"), [
    ("file", "is a regular file; it must be a directory"),
    ("fifo", "is a FIFO; it must be a directory"),
    ("sock", "is a socket; it must be a directory"),
])
def test_staging_and_mount_targets_must_be_directories(
        node: Node, specials: dict[str, Path], kind: str, message: str) -> None:
    unchanged(node, lambda: node.c.node.NodeStageVolume(stage_req(node.other, specials[kind])),
              C.ALREADY_EXISTS, message)
    unchanged(node, lambda: node.c.node.NodePublishVolume(
        publish_req(node.vol, node.staging, specials[kind])), C.ALREADY_EXISTS, message)


@pytest.mark.parametrize(("kind", "message"), [
    ("dir", "is a directory; it must be a regular file"),
    ("fifo", "is a FIFO; it must be a regular file"),
    ("sock", "is a socket; it must be a regular file"),
])
def test_block_targets_must_be_files_and_a_fifo_never_blocks(
        node: Node, specials: dict[str, Path], kind: str, message: str) -> None:
    def call() -> object:
        return node.c.node.NodePublishVolume(publish_req(
            node.blk, node.rig.root / "staging-blk", specials[kind], block_cap()))

    done = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            unchanged(node, call, C.ALREADY_EXISTS, message)
        except BaseException as err:
            outcome.append(err)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    # generous: the call opens nothing, so it cannot wait on the FIFO's other end
    assert done.wait(60), "NodePublishVolume blocked on a special file"
    if outcome:
        raise outcome[0]
    # the volume's lock was released: a valid publish of it works at once
    target = node.pods / "blk-target"
    node.c.node.NodePublishVolume(publish_req(node.blk, node.rig.root / "staging-blk",
                                              target, block_cap()))
    node.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=node.blk, target_path=str(target)))


def test_proc_nul_and_long_components(node: Node) -> None:
    root = str(node.rig.root)
    for path, match in [
        ("/proc/1/root" + root + "/pods/x", "outside the allowed roots"),
        (f"/proc/{os.getpid()}/cwd/x", "outside the allowed roots"),
        (root + "/pods/a\0b", "control character"),
        (root + "/pods/" + "x" * 256, "component of 256 bytes"),
        (root + "/pods/" + "/".join(["d"] * 2100), "longer than 4096 bytes"),
        (root, "an allowed root itself"),
    ]:
        unchanged(node, lambda path=path: node.c.node.NodeStageVolume(  # type: ignore[misc]
            stage_req(node.other, path)), C.INVALID_ARGUMENT, match)
        unchanged(node, lambda path=path: node.c.node.NodePublishVolume(  # type: ignore[misc]
            publish_req(node.vol, node.staging, path)), C.INVALID_ARGUMENT, match)
        unchanged(node, lambda path=path: node.c.node.NodeUnpublishVolume(  # type: ignore[misc]
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=node.vol, target_path=path)),
            C.INVALID_ARGUMENT, match)


# ---- ownership: a path must hold the request's volume ------------------------------------

def test_cross_volume_paths_are_refused(node: Node) -> None:
    n = node
    unchanged(n, lambda: n.c.node.NodePublishVolume(
        publish_req(n.other, n.staging, n.pods / "b2")), C.FAILED_PRECONDITION,
        "holds /dev/loop")
    unchanged(n, lambda: n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=n.other, target_path=str(n.target))), C.FAILED_PRECONDITION,
        f"which is not volume {n.other}; nothing was unmounted")
    unchanged(n, lambda: n.c.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=n.blk, staging_target_path=str(n.staging))), C.FAILED_PRECONDITION,
        f"which is not volume {n.blk}; nothing was unmounted")
    unchanged(n, lambda: n.c.node.NodeStageVolume(stage_req(n.other, n.staging)),
              C.ALREADY_EXISTS, "already has /dev/loop")
    unchanged(n, lambda: n.c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=n.other, volume_path=str(n.target))), C.NOT_FOUND, "is not available at")
    gone = "p:vol-" + "0" * 32
    unchanged(n, lambda: n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=gone, target_path=str(n.target))), C.NOT_FOUND, "is left alone")


def test_no_mount_inside_a_volume_or_over_mounts(node: Node) -> None:
    n = node
    unchanged(n, lambda: n.c.node.NodePublishVolume(
        publish_req(n.other, n.other_staging, n.staging / "nested")), C.INVALID_ARGUMENT,
        f"is inside the filesystem of volume {n.vol}")
    unchanged(n, lambda: n.c.node.NodeStageVolume(stage_req(n.other, n.target / "nested")),
              C.INVALID_ARGUMENT, f"is inside the filesystem of volume {n.vol}")
    unchanged(n, lambda: n.c.node.NodePublishVolume(
        publish_req(n.other, n.other_staging, n.pods)), C.FAILED_PRECONDITION,
        "mounted below it")
    # unpublish never removes a volume's own files
    unchanged(n, lambda: n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=n.vol, target_path=str(n.staging / "lost+found"))), C.INVALID_ARGUMENT,
        f"is inside the filesystem of volume {n.vol}")
    assert (n.staging / "lost+found").is_dir()


def test_refused_mount_flags_change_nothing(node: Node) -> None:
    n = node
    fresh = n.c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="fresh", volume_capabilities=[mount_cap()])).volume.volume_id
    staging = n.rig.root / "staging-flags"
    for flag, match in [
        ("bind", "mount flag 'bind' is not allowed"),
        ("X-mount.mkdir", "mount flag 'X-mount.mkdir' is not allowed"),
        ("loop=/dev/loop0", "mount flag 'loop=/dev/loop0' is not allowed"),
    ]:
        cap = mount_cap(flags=(flag,))
        unchanged(n, lambda cap=cap: n.c.node.NodeStageVolume(  # type: ignore[misc]
            stage_req(fresh, staging, cap)), C.INVALID_ARGUMENT, match)
        unchanged(n, lambda cap=cap: n.c.node.NodePublishVolume(  # type: ignore[misc]
            publish_req(n.vol, n.staging, n.pods / "flags", cap)), C.INVALID_ARGUMENT, match)
    # an option the filesystem does not know fails the stage (a bind at publish carries
    # per-mount flags only; the kernel ignores filesystem options there)
    unchanged(n, lambda: n.c.node.NodeStageVolume(stage_req(
        fresh, staging, mount_cap(flags=("no-such-option-flotilla",)))), C.INVALID_ARGUMENT,
        "with mount flags ['no-such-option-flotilla'] failed; check the StorageClass")
    n.c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=fresh))


def test_busy_unmount_is_a_precondition(node: Node) -> None:
    n = node
    target = n.pods / "busy"
    n.c.node.NodePublishVolume(publish_req(n.vol, n.staging, target))
    holder = subprocess.Popen(["sleep", "600"], cwd=target)
    try:
        unchanged(n, lambda: n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=n.vol, target_path=str(target))), C.FAILED_PRECONDITION, "is busy")
    finally:
        holder.kill()
        holder.wait()
    n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=n.vol, target_path=str(target)))
    assert not target.exists()


# ---- races -------------------------------------------------------------------------------

def test_stats_racing_unpublish_never_fails_internally(node: Node) -> None:
    """kubelet's volume stats run beside unpublish: a path that vanishes between two looks
    is NOT_FOUND, never INTERNAL."""
    n = node
    target = n.pods / "racy"
    stop = threading.Event()
    codes: Counter[str] = Counter()

    def stats() -> None:
        while not stop.is_set():
            try:
                n.c.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                    volume_id=n.vol, volume_path=str(target)))
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1  # type: ignore[attr-defined]

    threads = [threading.Thread(target=stats) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(40):
            n.c.node.NodePublishVolume(publish_req(n.vol, n.staging, target))
            n.c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=n.vol, target_path=str(target)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"stats during 40 publish/unpublish cycles: {dict(codes)}")
    assert set(codes) <= {"OK", "NOT_FOUND"}, codes
    assert codes["NOT_FOUND"] > 0


# ---- the gRPC layer ----------------------------------------------------------------------

ALL_METHODS = [(s.full_name, m.name) for s in csi_pb2.DESCRIPTOR.services_by_name.values()
               for m in s.methods if not m.server_streaming]


def test_unserved_rpcs_are_unimplemented(node: Node) -> None:
    ch = node.rig.driver.channel
    assert ch is not None
    unserved = [(s.full_name, m.name) for s in csi_pb2.DESCRIPTOR.services_by_name.values()
                if s.name in ("GroupController", "SnapshotMetadata") for m in s.methods]
    for service, method in [("csi.v1.Controller", "ControllerPublishVolume"),
                            ("csi.v1.Controller", "ControllerUnpublishVolume"),
                            ("csi.v1.Controller", "ControllerModifyVolume"), *unserved]:
        call = ch.unary_unary(f"/{service}/{method}", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        refused(lambda call=call: call(b""), C.UNIMPLEMENTED,  # type: ignore[misc]
                "is not served" if service == "csi.v1.Controller" else "")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_undecodable_bodies_are_invalid_and_cost_no_memory(node: Node) -> None:
    """Bodies that are not the method's message (random bytes, invalid UTF-8 in string
    fields, truncated varints) answer INVALID_ARGUMENT; the driver's memory stays flat."""
    ch = node.rig.driver.channel
    proc = node.rig.driver.proc
    assert ch is not None and proc is not None
    rnd = random.Random(20)
    bodies = [bytes([0x0A, 0x02, 0xFF, 0xFE]),  # field 1 (a string): invalid UTF-8
              bytes([0x08, 0xFF, 0xFF, 0xFF]),  # a truncated varint
              bytes([0x0A, 0x7F, 0x41])]  # a length past the end

    def body() -> bytes:
        if rnd.random() < 0.3:
            return rnd.choice(bodies)
        return rnd.randbytes(rnd.randint(9 << 10, 16 << 10))

    stubs = [ch.unary_unary(f"/{s}/{m}", request_serializer=lambda b: b,
                            response_deserializer=lambda b: b)
             for s, m in ALL_METHODS
             if s in ("csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node")]
    codes: Counter[str] = Counter()

    def burst(n: int) -> None:
        for _ in range(n):
            for stub in stubs:
                try:
                    stub(body(), timeout=30)
                    codes["OK"] += 1
                except grpc.RpcError as err:
                    codes[err.code().name] += 1  # type: ignore[attr-defined]

    burst(20)  # warm up: gRPC's buffers and pools settle
    before = rss_kib(proc.pid)
    burst(UNDECODABLE_PER_METHOD)
    after = rss_kib(proc.pid)
    total = sum(codes.values())
    print(f"{total} undecodable requests: {dict(codes)}; RSS {before} -> {after} KiB")
    # most random bodies happen to decode (any bytes can be a valid message with
    # unknown fields); what does not decode must be INVALID_ARGUMENT
    assert codes["INVALID_ARGUMENT"] > total // 4
    assert not {"INTERNAL", "UNKNOWN"} & set(codes), codes
    # a leak of ~10 KiB per request shows as tens of MiB here
    assert after - before < 16 << 10, f"RSS grew {after - before} KiB"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_one_event_one_line(rig: Rig, fmt: str) -> None:
    rig.driver.argv += ["--log-format", fmt]
    c = rig.driver.start()
    evil = "x\nFAKE 2026 INFO flotilla CreateVolume OK name=forged\r\u2028"
    try:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                c.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                    name=evil, volume_capabilities=[mount_cap()]))
            with pytest.raises(grpc.RpcError):
                c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id="p:vol-x", target_path=str(rig.root) + "/" + evil))
    finally:
        assert rig.driver.stop() == 0
    lines = rig.driver.log.read_text().splitlines()
    assert not any(line.startswith("FAKE") or "\u2028" in line or "\r" in line
                   for line in lines)
    events = [line for line in lines
              if any(f'{m} INVALID_ARGUMENT' in line or f'"method": "{m}"' in line
                     for m in ("CreateVolume", "NodeUnpublishVolume"))]
    assert len(events) == 6, events
    if fmt == "json":
        for line in events:
            entry = json.loads(line)
            assert entry["code"] == "INVALID_ARGUMENT"
    else:
        created = [line for line in events if " CreateVolume INVALID_ARGUMENT " in line]
        assert len(created) == 3
        assert all(' name="x\\nFAKE' in line for line in created), created


def test_a_request_never_holds_a_lock_after_it_answers(node: Node, specials: dict[str, Path]
                                                       ) -> None:
    """Hostile calls on a volume, each answered at once; a valid call on the same volume
    right after each one is never ABORTED."""
    n = node
    t0 = time.monotonic()
    for path in specials.values():
        for call in (lambda p=path: n.c.node.NodePublishVolume(
                         publish_req(n.blk, n.rig.root / "staging-blk", p, block_cap())),
                     lambda p=path: n.c.node.NodeStageVolume(stage_req(n.blk, p, block_cap())),
                     lambda p=path: n.c.node.NodeUnpublishVolume(
                         csi_pb2.NodeUnpublishVolumeRequest(volume_id=n.blk,
                                                            target_path=str(p)))):
            try:
                call()  # type: ignore[no-untyped-call]
            except grpc.RpcError as err:
                assert err.code() not in (C.INTERNAL, C.UNKNOWN, C.ABORTED), err.details()  # type: ignore[attr-defined]
            n.c.node.NodeStageVolume(stage_req(n.blk, n.rig.root / "staging-blk",
                                               block_cap()))
    print(f"{len(specials) * 3} hostile calls and their follow-ups in "
          f"{time.monotonic() - t0:.1f}s")
