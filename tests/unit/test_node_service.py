"""NodeService over in-memory pools and a fake System, no root: stage, publish, unpublish,
unstage, stats and expansion, for mount and raw block volumes of a device pool and for a
network pool; every refusal with its code and message, and that a refused call leaves the
mount table, the attached devices and the directories as they were.

Node paths are real directories beneath a temporary allowed root (resolved by the real
:meth:`System.node_path`: links, FIFOs and missing directories are the kernel's); mounts,
devices and filesystems are the records of :class:`tests.unit.fakes.FakeSystem`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2
from csi.errors import CommandFailed, CommandTimeout, FailedPrecondition
from csi.locks import KeyedTryLock
from csi.node import NodeService
from csi.pools import PoolSet
from csi.pools.base import Condition, VolumeRequest, new_id
from csi.system import MountInfo
from tests.unit.fakes import (
    RWO,
    DeviceMemoryPool,
    FakeSystem,
    GiB,
    Mode,
    NetworkMemoryPool,
    call,
    cap,
    expect,
    uid,
)

Code = grpc.StatusCode
NODE = "node-1"
MISSING = new_id("local", "vol")


def device(volume_id: str) -> str:
    """The device DeviceMemoryPool attaches ``volume_id`` as."""
    return f"/dev/fake-{uid(volume_id)}"


@dataclass
class Node:
    svc: NodeService
    system: FakeSystem
    local: DeviceMemoryPool
    shared: NetworkMemoryPool
    locks: KeyedTryLock
    root: Path
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def volume(self, name: str = "pvc-1", pool: str = "local", size: int = GiB,
               fs_type: str = "ext4") -> str:
        target = self.local if pool == "local" else self.shared
        return target.create_volume(VolumeRequest(
            name=name, size=size, required=size, limit=0, fs_type=fs_type,
            block=False)).id

    def staging(self, name: str = "pvc-1") -> str:
        return str(self.root / "plugins/kubernetes.io/csi/flotilla.csi.io" / name /
                   "globalmount")

    def target(self, name: str = "pvc-1", pod: str = "pod-1") -> str:
        return str(self.root / "pods" / pod / "volumes/kubernetes.io~csi" / name / "mount")

    def hold(self, key: str) -> None:
        self.held.enter_context(self.locks.hold(key))

    def stage(self, volume_id: str, staging: str | None = None, kind: str = "mount",
              **kw: Any) -> csi_pb2.NodeStageVolumeResponse:
        return call(self.svc.NodeStageVolume, stage_req(
            volume_id, staging or self.staging(), cap(kind, **kw)))

    def publish(self, volume_id: str, target: str | None = None,
                staging: str | None = None, kind: str = "mount", readonly: bool = False,
                **kw: Any) -> csi_pb2.NodePublishVolumeResponse:
        return call(self.svc.NodePublishVolume, publish_req(
            volume_id, target or self.target(), staging or self.staging(),
            cap(kind, **kw), readonly))

    def unpublish(self, volume_id: str, target: str | None = None) -> None:
        call(self.svc.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target or self.target()))

    def unstage(self, volume_id: str, staging: str | None = None) -> None:
        call(self.svc.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging or self.staging()))

    def state(self) -> tuple[Any, ...]:
        """What a refused call must leave as it was: mounts, devices, files."""
        files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))
        return list(self.system.table), dict(self.local.attached), files

    def add_mount(self, path: str, source: str = "tmpfs", fstype: str = "tmpfs",
                  major_minor: str = "0:99") -> MountInfo:
        """Something mounted by someone else (or a stand-in for an odd state)."""
        m = MountInfo(mount_id=999, major_minor=major_minor, root="/",
                      mount_point=os.path.normpath(path), options=("rw",), fstype=fstype,
                      source=source, super_options=("rw",))
        self.system.table.append(m)
        return m


def stage_req(volume_id: str, staging: str, capability: csi_pb2.VolumeCapability | None,
              context: dict[str, str] | None = None) -> csi_pb2.NodeStageVolumeRequest:
    req = csi_pb2.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging,
                                         volume_context=context or {})
    if capability is not None:
        req.volume_capability.CopyFrom(capability)
    return req


def publish_req(volume_id: str, target: str, staging: str,
                capability: csi_pb2.VolumeCapability | None, readonly: bool = False
                ) -> csi_pb2.NodePublishVolumeRequest:
    req = csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=target,
                                           staging_target_path=staging, readonly=readonly)
    if capability is not None:
        req.volume_capability.CopyFrom(capability)
    return req


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "kubelet"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    system = FakeSystem()
    local, shared = DeviceMemoryPool(system, "local"), NetworkMemoryPool("shared")
    locks = KeyedTryLock()
    svc = NodeService(PoolSet([local, shared]), system, NODE, locks, [str(root)], 16)
    n = Node(svc, system, local, shared, locks, root)
    with n.held:
        yield n


Build = Callable[[Node, str], Any]  # (node, a volume id of the local pool) -> request


def _link(n: Node, name: str) -> Path:
    link = n.root / name
    link.symlink_to(n.root.parent / "outside")
    return link


def _file(n: Node, name: str) -> Path:
    f = n.root / name
    f.write_text("")
    return f


# ---- NodeStageVolume --------------------------------------------------------------------


def _fs_on_device(n: Node, v: str, fs_type: str) -> None:
    n.system.filesystems[device(v)] = fs_type
    n.system.fs_bytes[device(v)] = GiB


STAGE_ERRORS = [
    pytest.param(lambda n, v: stage_req("", n.staging(), cap()), Code.INVALID_ARGUMENT,
                 r"^volume_id is required$", id="no-volume-id"),
    pytest.param(lambda n, v: stage_req("local:../x", n.staging(), cap()),
                 Code.INVALID_ARGUMENT, r"^volume_id 'local:../x' must not contain '/' or "
                 r"'..'$", id="volume-id-with-dotdot"),
    pytest.param(lambda n, v: stage_req(v, "", cap()), Code.INVALID_ARGUMENT,
                 r"^staging_target_path is required$", id="no-staging-path"),
    pytest.param(lambda n, v: stage_req(v, "var/lib/kubelet/x", cap()), Code.INVALID_ARGUMENT,
                 r"^staging_target_path 'var/lib/kubelet/x' must be an absolute path$",
                 id="relative-path"),
    pytest.param(lambda n, v: stage_req(v, f"{n.root}/a/../../outside/x", cap()),
                 Code.INVALID_ARGUMENT, r"^staging_target_path '.*' must not contain '..'$",
                 id="dotdot-path"),
    pytest.param(lambda n, v: stage_req(v, "/elsewhere/globalmount", cap()),
                 Code.INVALID_ARGUMENT, r"^staging_target_path '/elsewhere/globalmount' is "
                 r"outside the allowed roots \(.*/kubelet\); add its root to allowed_roots",
                 id="outside-the-roots"),
    pytest.param(lambda n, v: stage_req(v, str(n.root), cap()), Code.INVALID_ARGUMENT,
                 r"^staging_target_path '.*/kubelet' is an allowed root itself; it must be a "
                 "path below it$", id="the-root-itself"),
    pytest.param(lambda n, v: stage_req(v, f"{_link(n, 'plugins')}/pv/globalmount", cap()),
                 Code.INVALID_ARGUMENT, r"^staging_target_path '.*' passes through the "
                 r"symbolic link .*/kubelet/plugins; Flotilla follows no links in node paths$",
                 id="through-a-link"),
    pytest.param(lambda n, v: stage_req(v, f"{_file(n, 'plugins')}/pv/globalmount", cap()),
                 Code.INVALID_ARGUMENT, r"^staging_target_path '.*': .*/kubelet/plugins is a "
                 "regular file, not a directory$", id="through-a-file"),
    pytest.param(lambda n, v: (n.add_mount(str(n.root / "nfs"), "srv:/x", "nfs4"),
                               stage_req(v, f"{n.root}/nfs/pv/globalmount", cap()))[1],
                 Code.INVALID_ARGUMENT, r"^staging_target_path '.*' is inside the nfs4 mount "
                 r"at .*/kubelet/nfs; node paths must not be inside a network filesystem$",
                 id="inside-a-network-mount"),
    pytest.param(lambda n, v: stage_req(v, n.staging(), None), Code.INVALID_ARGUMENT,
                 r"^volume_capability is required$", id="no-capability"),
    pytest.param(lambda n, v: stage_req(v, n.staging(), cap(mode=Mode.UNKNOWN)),
                 Code.INVALID_ARGUMENT, r"^volume_capability: each capability needs an "
                 "access_mode$", id="no-access-mode"),
    pytest.param(lambda n, v: stage_req(v, n.staging(), cap(fs_type="btrfs")),
                 Code.INVALID_ARGUMENT, r"^fs_type 'btrfs' is not supported; use one of "
                 "ext4, xfs$", id="unsupported-fs-type"),
    pytest.param(lambda n, v: stage_req(v, n.staging(), cap(), {"fsType": "zfs"}),
                 Code.INVALID_ARGUMENT, r"^fsType 'zfs' is not supported; use one of ext4, "
                 "xfs$", id="unsupported-fsType-in-context"),
    pytest.param(lambda n, v: stage_req(v, n.staging(), cap(flags=("remount",))),
                 Code.INVALID_ARGUMENT, r"^mount flag 'remount' is not allowed",
                 id="refused-mount-flag"),
    pytest.param(lambda n, v: stage_req(MISSING, n.staging(), cap()), Code.NOT_FOUND,
                 rf"^volume {MISSING} does not exist on node node-1$", id="missing-volume"),
    pytest.param(lambda n, v: stage_req("pvc-not-ours", n.staging(), cap()), Code.NOT_FOUND,
                 r"^volume pvc-not-ours does not exist on node node-1$", id="foreign-id"),
    pytest.param(lambda n, v: (n.hold(v), stage_req(v, n.staging(), cap()))[1], Code.ABORTED,
                 r"^an operation on 'local:vol-\w+' is already in progress; retry later$",
                 id="busy"),
    pytest.param(lambda n, v: (_fs_on_device(n, v, "xfs"),
                               stage_req(v, n.staging(), cap(fs_type="ext4")))[1],
                 Code.FAILED_PRECONDITION, r"^volume local:vol-\w+ already holds a xfs "
                 "filesystem; it cannot be staged as ext4$", id="another-filesystem"),
    pytest.param(lambda n, v: (n.system.fail.__setitem__("mount", CommandFailed(
        ["mount"], 32, "mount: wrong fs type, bad option, bad superblock")),
        stage_req(v, n.staging(), cap(flags=("noatime", "data=journal"))))[1],
        Code.INVALID_ARGUMENT, r"^mounting volume local:vol-\w+ with mount flags "
        r"\['noatime', 'data=journal'\] failed; check the StorageClass mountOptions: mount: "
        "wrong fs type", id="mount-fails-with-flags"),
    pytest.param(lambda n, v: (n.system.fail.__setitem__("mount", CommandFailed(
        ["mount"], 32, "mount: can't read superblock")), stage_req(v, n.staging(), cap()))[1],
        Code.INTERNAL, r"^mount exited 32: mount: can't read superblock$",
        id="mount-fails"),
    pytest.param(lambda n, v: (n.system.fail.__setitem__("mount", CommandTimeout(
        ["mount"], None, "no answer within 60s")),
        stage_req(v, n.staging(), cap(flags=("noatime",))))[1],
        Code.INTERNAL, r"^mount timed out and was killed: no answer within 60s$",
        id="mount-times-out-with-flags"),
    pytest.param(lambda n, v: (n.system.fail.__setitem__("mkfs", CommandFailed(
        ["mkfs.ext4"], 1, "mkfs.ext4: Device size reported to be zero")),
        stage_req(v, n.staging(), cap()))[1],
        Code.INTERNAL, r"^mkfs.ext4 exited 1: mkfs.ext4: Device size", id="mkfs-fails"),
    pytest.param(lambda n, v: (_fs_on_device(n, v, "ext4"), n.system.fail.__setitem__(
        "fsck", FailedPrecondition("filesystem on /dev/x has errors e2fsck -p cannot fix")),
        stage_req(v, n.staging(), cap()))[2],
        Code.FAILED_PRECONDITION, r"has errors e2fsck -p cannot fix", id="fsck-fails"),
    pytest.param(lambda n, v: stage_req(n.volume("pvc-nfs", "shared"), n.staging(),
                                        cap("block")),
                 Code.INVALID_ARGUMENT, r"^pool 'shared' \(memory-network\) serves filesystem "
                 "volumes only, not raw block$", id="block-on-a-network-pool"),
]


@pytest.mark.parametrize(("build", "code", "match"), STAGE_ERRORS)
def test_stage_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    req = build(node, node.volume())
    before = node.state()
    expect(code, match, node.svc.NodeStageVolume, req)
    assert node.state() == before, "a refused stage changes nothing"


def test_stage_over_another_mount_is_refused_and_changes_nothing(node: Node) -> None:
    """A foreign mount at the staging path: ALREADY_EXISTS before anything is attached,
    and nothing unmounted."""
    vid = node.volume()
    os.makedirs(node.staging())
    node.add_mount(node.staging())
    expect(Code.ALREADY_EXISTS, r"^staging_target_path .*/globalmount already has tmpfs "
           "mounted$", node.svc.NodeStageVolume, stage_req(vid, node.staging(), cap()))
    assert [m.source for m in node.system.table] == ["tmpfs"]
    assert node.local.attached == {}
    assert not node.system.effects("mkfs", "mount", "attach")


@pytest.mark.parametrize(("fs_type", "existing", "fs_bytes", "effects"), [
    pytest.param("ext4", None, 0, [("mkfs", "ext4"), ("mount", "ext4", ())], id="new-ext4"),
    pytest.param("xfs", None, 0, [("mkfs", "xfs"), ("mount", "xfs", ("nouuid",))],
                 id="new-xfs-nouuid"),
    pytest.param("ext4", "ext4", GiB, [("fsck", "ext4", False), ("mount", "ext4", ())],
                 id="existing-ext4"),
    pytest.param("ext4", "ext4", GiB // 2,
                 [("fsck", "ext4", False), ("fsck", "ext4", True), ("grow_fs", "ext4", None),
                  ("mount", "ext4", ())], id="ext4-grown-offline-before-mount"),
    pytest.param("xfs", "xfs", GiB // 2,
                 [("fsck", "xfs", False), ("mount", "xfs", ("nouuid",)),
                  ("grow_fs", "xfs", "STAGING")], id="xfs-grown-online-after-mount"),
])
def test_stage_mount(node: Node, fs_type: str, existing: str | None, fs_bytes: int,
                     effects: list[tuple[Any, ...]]) -> None:
    vid = node.volume(fs_type=fs_type)
    dev = device(vid)
    if existing:
        node.system.filesystems[dev] = existing
        node.system.fs_bytes[dev] = fs_bytes
    node.stage(vid, fs_type=fs_type)
    staging = node.staging()

    def expand(effect: tuple[Any, ...]) -> tuple[Any, ...]:
        name, *rest = effect
        if name == "mount":
            return ("mount", dev, staging, rest[0], rest[1])
        if name == "grow_fs":
            return ("grow_fs", rest[0], dev, staging if rest[1] == "STAGING" else None)
        return (name, dev, *rest)

    assert node.system.effects() == [("attach", vid, dev), *map(expand, effects)]
    (m,) = node.system.mounted(staging)
    assert (m.source, m.fstype, m.readonly) == (dev, fs_type, False)
    assert node.system.fs_bytes[dev] == GiB, "the filesystem fills its device"
    calls = len(node.system.calls)
    node.stage(vid, fs_type=fs_type)
    assert len(node.system.calls) == calls, "a repeated stage is a no-op"


def test_stage_mount_options(node: Node) -> None:
    node.local.mount_options = ("discard",)
    vid = node.volume()
    node.stage(vid, fs_type="xfs", flags=("noatime",))
    (mount,) = node.system.effects("mount")
    assert mount[3:] == ("xfs", ("discard", "noatime", "nouuid"))


def test_stage_fs_type_from_the_volume_context(node: Node) -> None:
    vid = node.volume()
    call(node.svc.NodeStageVolume, stage_req(vid, node.staging(), cap(),
                                             {"fsType": "xfs", "pool": "local"}))
    assert node.system.filesystems[device(vid)] == "xfs"


def test_stage_block_attaches_only(node: Node) -> None:
    vid = node.volume()
    node.stage(vid, kind="block")
    assert node.system.effects() == [("attach", vid, device(vid))]
    assert not node.system.table and not os.path.exists(node.staging())
    node.stage(vid, kind="block")
    assert len(node.system.calls) == 1


def test_stage_on_a_network_pool_does_nothing(node: Node) -> None:
    vid = node.volume("pvc-nfs", "shared")
    node.stage(vid)
    assert not node.system.calls and not node.system.table


# ---- NodePublishVolume ------------------------------------------------------------------


def _staged(n: Node, v: str, kind: str = "mount") -> str:
    n.stage(v, kind=kind)
    return v


def _other_staged(n: Node) -> str:
    other = n.volume("pvc-2")
    n.stage(other, n.staging("pvc-2"))
    return other


PUBLISH_ERRORS = [
    pytest.param(lambda n, v: publish_req(v, "", n.staging(), cap()), Code.INVALID_ARGUMENT,
                 r"^target_path is required$", id="no-target"),
    pytest.param(lambda n, v: publish_req(v, "/elsewhere/mount", n.staging(), cap()),
                 Code.INVALID_ARGUMENT, r"^target_path '/elsewhere/mount' is outside the "
                 "allowed roots", id="target-outside-the-roots"),
    pytest.param(lambda n, v: publish_req(v, n.target(), "", cap()), Code.INVALID_ARGUMENT,
                 r"^staging_target_path is required$", id="no-staging-path"),
    pytest.param(lambda n, v: publish_req(v, n.target(), n.staging(), None),
                 Code.INVALID_ARGUMENT, r"^volume_capability is required$", id="no-capability"),
    pytest.param(lambda n, v: publish_req(MISSING, n.target(), n.staging(), cap()),
                 Code.NOT_FOUND, rf"^volume {MISSING} does not exist on node node-1$",
                 id="missing-volume"),
    pytest.param(lambda n, v: (n.hold(_staged(n, v)),
                               publish_req(v, n.target(), n.staging(), cap()))[1],
                 Code.ABORTED, r"^an operation on 'local:vol-\w+' is already in progress",
                 id="busy"),
    pytest.param(lambda n, v: publish_req(v, n.target(), n.staging(), cap()),
                 Code.FAILED_PRECONDITION, r"^volume local:vol-\w+ is not staged on this node; "
                 "call NodeStageVolume first$", id="not-staged"),
    pytest.param(lambda n, v: (_staged(n, v, "block"), os.makedirs(n.staging()),
                               publish_req(v, n.target(), n.staging(), cap()))[2],
                 Code.FAILED_PRECONDITION, r"^volume local:vol-\w+ is not staged at "
                 r".*/globalmount; call NodeStageVolume first$", id="attached-not-mounted"),
    pytest.param(lambda n, v: (_staged(n, v, "block"), _other_staged(n),
                               publish_req(v, n.target(), n.staging("pvc-2"), cap()))[2],
                 Code.FAILED_PRECONDITION, r"^staging_target_path .*/pvc-2/globalmount holds "
                 r"/dev/fake-\w+, not volume local:vol-\w+$", id="staging-holds-another"),
    pytest.param(lambda n, v: (_staged(n, v), _other_staged(n), publish_req(
        v, n.staging("pvc-2") + "/sub/mount", n.staging(), cap()))[2],
        Code.INVALID_ARGUMENT, r"^target_path '.*/pvc-2/globalmount/sub/mount' is inside the "
        r"filesystem of volume local:vol-\w+ \(mounted at .*/pvc-2/globalmount\); stage and "
        "publish paths must be outside every volume$", id="inside-another-volume"),
    pytest.param(lambda n, v: (_staged(n, v), os.makedirs(n.target()),
                               n.add_mount(n.target() + "/below"),
                               publish_req(v, n.target(), n.staging(), cap()))[3],
                 Code.FAILED_PRECONDITION, r"^target_path '.*/mount' has .*/mount/below "
                 "mounted below it; unmount that first$", id="mounts-below"),
    pytest.param(lambda n, v: (_staged(n, v), os.makedirs(os.path.dirname(n.target())),
                               os.mkfifo(n.target()),
                               publish_req(v, n.target(), n.staging(), cap()))[3],
                 Code.ALREADY_EXISTS, r"^target_path '.*/mount' is a FIFO; it must be a "
                 "directory$", id="target-is-a-fifo"),
    pytest.param(lambda n, v: (_staged(n, v), os.makedirs(os.path.dirname(n.target())),
                               os.symlink("/", n.target()),
                               publish_req(v, n.target(), n.staging(), cap()))[3],
                 Code.INVALID_ARGUMENT, r"^target_path '.*/mount' is a symbolic link; it must "
                 "be a directory$", id="target-is-a-link"),
    pytest.param(lambda n, v: (_staged(n, v, "block"), os.makedirs(n.target()),
                               publish_req(v, n.target(), n.staging(), cap("block")))[2],
                 Code.ALREADY_EXISTS, r"^target_path '.*/mount' is a directory; it must be a "
                 "regular file$", id="block-target-is-a-directory"),
    pytest.param(lambda n, v: (_staged(n, v), n.system.fail.__setitem__(
        "bind_mount", CommandFailed(["mount"], 32, "mount: bad option")),
        publish_req(v, n.target(), n.staging(), cap(flags=("noexec",))))[2],
        Code.INVALID_ARGUMENT, r"^publishing at .*/mount with mount flags \['noexec'\] failed; "
        "check the StorageClass mountOptions: mount: bad option$", id="bind-fails-with-flags"),
    pytest.param(lambda n, v: publish_req(n.volume("pvc-nfs", "shared"), n.target(),
                                          n.staging(), cap("block")),
                 Code.INVALID_ARGUMENT, r"^pool 'shared' \(memory-network\) serves filesystem "
                 "volumes only, not raw block$", id="block-on-a-network-pool"),
]


@pytest.mark.parametrize(("build", "code", "match"), PUBLISH_ERRORS)
def test_publish_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    req = build(node, node.volume())
    before = node.state()
    expect(code, match, node.svc.NodePublishVolume, req)
    assert node.state() == before, "a refused publish changes nothing"


@pytest.mark.parametrize(("readonly", "mode", "ro"), [
    pytest.param(False, RWO, False, id="rw"),
    pytest.param(True, RWO, True, id="readonly-flag"),
    pytest.param(False, Mode.SINGLE_NODE_READER_ONLY, True, id="read-only-access-mode"),
])
def test_publish_mount(node: Node, readonly: bool, mode: Any, ro: bool) -> None:
    vid = node.volume()
    node.stage(vid)
    node.publish(vid, readonly=readonly, mode=mode)
    target = node.target()
    assert node.system.effects("bind_mount") == [("bind_mount", node.staging(), target, ro, ())]
    (staged,) = node.system.mounted(node.staging())
    (published,) = node.system.mounted(target)
    assert (published.source, published.major_minor, published.readonly) == \
        (device(vid), staged.major_minor, ro)
    assert os.path.isdir(target)
    calls = len(node.system.calls)
    node.publish(vid, readonly=readonly, mode=mode)
    assert len(node.system.calls) == calls, "a repeated publish is a no-op"
    expect(Code.ALREADY_EXISTS, rf"^target_path {target} is already a mount of "
           rf"{device(vid)} \({'ro' if ro else 'rw'}\), incompatible with this request$",
           node.svc.NodePublishVolume,
           publish_req(vid, target, node.staging(), cap(), readonly=not ro))
    node.publish(vid, node.target(pod="pod-2"), readonly=True)
    assert node.system.mounted(node.target(pod="pod-2"))[0].readonly


def test_publish_block(node: Node) -> None:
    vid = node.volume()
    node.stage(vid, kind="block")
    node.publish(vid, kind="block")
    target = node.target()
    assert os.path.isfile(target) and not os.path.islink(target)
    assert node.system.effects("bind_mount") == [("bind_mount", device(vid), target, False,
                                                  ())]
    (m,) = node.system.mounted(target)
    assert (m.fstype, m.root) == ("devtmpfs", "/" + os.path.basename(device(vid)))
    calls = len(node.system.calls)
    node.publish(vid, kind="block")
    assert len(node.system.calls) == calls


def test_publish_network(node: Node) -> None:
    vid = node.volume("pvc-nfs", "shared")
    node.stage(vid)
    node.publish(vid, flags=("noatime",))
    target = node.target()
    source = f"server:/export/volumes/{uid(vid)}"
    assert node.system.effects() == [("mount", source, target, "nfs", ("vers=4.2", "noatime"))]
    node.publish(vid, flags=("noatime",))
    assert len(node.system.calls) == 1, "a repeated publish is a no-op"
    expect(Code.ALREADY_EXISTS, rf"^target_path {target} already has {source} \(rw\) "
           "mounted$", node.svc.NodePublishVolume,
           publish_req(vid, target, node.staging(), cap(), readonly=True))
    node.publish(vid, node.target(pod="pod-2"), readonly=True)
    assert node.system.effects()[-1][-1] == ("vers=4.2", "ro")
    # a stale mount (server gone, handle stale) is replaced
    node.system.stale.add(target)
    node.publish(vid, flags=("noatime",))
    assert node.system.effects()[-2:] == [
        ("umount_network", target),
        ("mount", source, target, "nfs", ("vers=4.2", "noatime"))]
    assert len(node.system.mounted(target)) == 1


def test_publish_network_over_a_stale_foreign_mount_is_refused(node: Node) -> None:
    vid = node.volume("pvc-nfs", "shared")
    os.makedirs(node.target())
    node.add_mount(node.target(), "other:/share", "nfs4")
    node.system.stale.add(node.target())
    before = node.state()
    expect(Code.FAILED_PRECONDITION, r"^target_path '.*/mount' holds other:/share \(nfs4\), "
           rf"which is not volume {vid}; nothing was unmounted$", node.svc.NodePublishVolume,
           publish_req(vid, node.target(), node.staging(), cap()))
    assert node.state() == before


# ---- NodeUnpublishVolume ----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "pool", "unmount"), [
    pytest.param("mount", "local", "umount", id="mount"),
    pytest.param("block", "local", "umount", id="block"),
    pytest.param("mount", "shared", "umount_network", id="network"),
])
def test_unpublish(node: Node, kind: str, pool: str, unmount: str) -> None:
    vid = node.volume(pool=pool)
    node.stage(vid, kind=kind)
    node.publish(vid, kind=kind)
    node.unpublish(vid)
    assert node.system.effects()[-1] == (unmount, node.target())
    assert not node.system.mounted(node.target())
    assert not os.path.lexists(node.target()), "the target is removed"
    assert os.path.isdir(os.path.dirname(node.target())), "its parent is the kubelet's"
    calls = len(node.system.calls)
    node.unpublish(vid)
    assert len(node.system.calls) == calls, "a repeated unpublish is a no-op"


def test_unpublish_removes_every_mount_of_the_volume(node: Node) -> None:
    vid = node.volume()
    node.stage(vid)
    node.publish(vid)
    staged = node.system.mounted(node.target())[0]
    node.add_mount(node.target(), staged.source, staged.fstype, staged.major_minor)
    node.unpublish(vid)
    assert node.system.effects("umount") == [("umount", node.target())] * 2
    assert not os.path.lexists(node.target())


UNPUBLISH_ERRORS = [
    pytest.param(lambda n, v: csi_pb2.NodeUnpublishVolumeRequest(volume_id=v),
                 Code.INVALID_ARGUMENT, r"^target_path is required$", id="no-target"),
    pytest.param(lambda n, v: csi_pb2.NodeUnpublishVolumeRequest(target_path=n.target()),
                 Code.INVALID_ARGUMENT, r"^volume_id is required$", id="no-volume-id"),
    pytest.param(lambda n, v: csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=v, target_path=f"{_link(n, 'pods')}/p/mount"), Code.INVALID_ARGUMENT,
        r"^target_path '.*' passes through the symbolic link .*/kubelet/pods",
        id="through-a-link"),
    pytest.param(lambda n, v: (n.hold(v), csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=v, target_path=n.target()))[1], Code.ABORTED,
        r"^an operation on 'local:vol-\w+' is already in progress", id="busy"),
    pytest.param(lambda n, v: (_staged(n, v), n.publish(v), csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=n.volume("pvc-2"), target_path=n.target()))[2], Code.FAILED_PRECONDITION,
        r"^target_path '.*/mount' holds /dev/fake-\w+ \(ext4\), which is not volume "
        r"local:vol-\w+; nothing was unmounted$", id="another-volume-there"),
    pytest.param(lambda n, v: (_staged(n, v), n.publish(v), csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=MISSING, target_path=n.target()))[2], Code.NOT_FOUND,
        rf"^volume {MISSING} does not exist on node node-1; /dev/fake-\w+ \(ext4\) mounted at "
        r"target_path '.*/mount' is left alone$", id="unknown-volume-mounted"),
    pytest.param(lambda n, v: (_staged(n, v), os.makedirs(n.staging() + "/data"),
                               csi_pb2.NodeUnpublishVolumeRequest(
                                   volume_id=v, target_path=n.staging() + "/data"))[2],
                 Code.INVALID_ARGUMENT, r"^target_path '.*/globalmount/data' is inside the "
                 r"filesystem of volume local:vol-\w+", id="inside-a-volume"),
]


@pytest.mark.parametrize(("build", "code", "match"), UNPUBLISH_ERRORS)
def test_unpublish_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    req = build(node, node.volume())
    before = node.state()
    expect(code, match, node.svc.NodeUnpublishVolume, req)
    assert node.state() == before, "a refused unpublish changes nothing"


@pytest.mark.parametrize("volume_id", [MISSING, "pvc-not-ours"])
def test_unpublish_of_nothing_is_done(node: Node, volume_id: str) -> None:
    node.unpublish(volume_id)  # no parent directory
    os.makedirs(node.target())
    node.unpublish(volume_id)  # an empty directory: removed
    assert not os.path.lexists(node.target())
    assert not node.system.calls


# ---- NodeUnstageVolume ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mount", "block"])
def test_unstage(node: Node, kind: str) -> None:
    vid = node.volume()
    node.stage(vid, kind=kind)
    node.unstage(vid)
    unmounted = [("umount", node.staging())] if kind == "mount" else []
    assert node.system.effects("umount", "detach") == \
        [*unmounted, ("detach", vid, device(vid))]
    assert not node.system.table and not node.local.attached
    calls = len(node.system.calls)
    node.unstage(vid)
    assert len(node.system.calls) == calls, "a repeated unstage is a no-op"


def test_unstage_of_a_published_block_volume_without_its_staging_directory(
        node: Node) -> None:
    """Block stage neither needs nor makes the staging directory; unstage without it still
    refuses while the device is bound at a target, and detaches nothing."""
    vid = node.volume()
    node.stage(vid, kind="block")
    node.publish(vid, kind="block")
    assert not os.path.exists(os.path.dirname(node.staging()))
    expect(Code.FAILED_PRECONDITION, r"^volume local:vol-\w+ is still published at "
           r".*/mount; NodeUnpublishVolume first$", node.svc.NodeUnstageVolume,
           csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=node.staging()))
    assert not node.system.effects("detach")
    assert node.system.mounted(node.target()), "the publish is still there"
    assert node.local.attached == {vid: device(vid)}


def test_unstage_of_nothing_is_done(node: Node) -> None:
    for vid in (node.volume(), MISSING, "pvc-not-ours", node.volume("nfs", "shared")):
        node.unstage(vid)
    assert not node.system.effects("umount", "detach")


UNSTAGE_ERRORS = [
    pytest.param(lambda n, v: csi_pb2.NodeUnstageVolumeRequest(volume_id=v),
                 Code.INVALID_ARGUMENT, r"^staging_target_path is required$", id="no-path"),
    pytest.param(lambda n, v: csi_pb2.NodeUnstageVolumeRequest(
        volume_id=v, staging_target_path="/etc/x"), Code.INVALID_ARGUMENT,
        r"^staging_target_path '/etc/x' is outside the allowed roots", id="outside"),
    pytest.param(lambda n, v: (n.hold(v), csi_pb2.NodeUnstageVolumeRequest(
        volume_id=v, staging_target_path=n.staging()))[1], Code.ABORTED,
        r"^an operation on 'local:vol-\w+' is already in progress", id="busy"),
    pytest.param(lambda n, v: (_staged(n, v), n.publish(v), csi_pb2.NodeUnstageVolumeRequest(
        volume_id=v, staging_target_path=n.staging()))[2], Code.FAILED_PRECONDITION,
        r"^volume local:vol-\w+ is still published at .*/pods/pod-1/volumes/kubernetes.io~csi/"
        "pvc-1/mount; NodeUnpublishVolume first$", id="still-published"),
    pytest.param(lambda n, v: (_staged(n, v, "block"), n.publish(v, kind="block"),
                               os.makedirs(n.staging()), csi_pb2.NodeUnstageVolumeRequest(
                                   volume_id=v, staging_target_path=n.staging()))[3],
                 Code.FAILED_PRECONDITION, r"^volume local:vol-\w+ is still published at "
                 ".*/mount; NodeUnpublishVolume first$", id="block-still-published"),
    pytest.param(lambda n, v: (_staged(n, v), csi_pb2.NodeUnstageVolumeRequest(
        volume_id=n.volume("pvc-2"), staging_target_path=n.staging()))[1],
        Code.FAILED_PRECONDITION, r"^staging_target_path '.*/globalmount' holds "
        r"/dev/fake-\w+ \(ext4\), which is not volume local:vol-\w+; nothing was unmounted$",
        id="another-volume-there"),
    pytest.param(lambda n, v: (_staged(n, v), csi_pb2.NodeUnstageVolumeRequest(
        volume_id=MISSING, staging_target_path=n.staging()))[1], Code.NOT_FOUND,
        rf"^volume {MISSING} does not exist on node node-1; .* is left alone$",
        id="unknown-volume-mounted"),
]


@pytest.mark.parametrize(("build", "code", "match"), UNSTAGE_ERRORS)
def test_unstage_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    req = build(node, node.volume())
    before = node.state()
    expect(code, match, node.svc.NodeUnstageVolume, req)
    assert node.state() == before, "a refused unstage changes nothing"


def test_a_whole_life(node: Node) -> None:
    """Stage, publish twice, unpublish both, unstage, stage again: the filesystem made
    the first time is checked, not made again."""
    vid = node.volume()
    node.stage(vid)
    node.publish(vid)
    node.publish(vid, node.target(pod="pod-2"), readonly=True)
    node.unpublish(vid)
    node.unpublish(vid, node.target(pod="pod-2"))
    node.unstage(vid)
    assert not node.system.table and not node.local.attached
    node.stage(vid)
    assert [c[0] for c in node.system.effects("mkfs", "fsck")] == ["mkfs", "fsck"]


# ---- NodeGetVolumeStats -----------------------------------------------------------------


def stats(n: Node, volume_id: str, path: str) -> csi_pb2.NodeGetVolumeStatsResponse:
    return call(n.svc.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume_id, volume_path=path))


def usage(resp: csi_pb2.NodeGetVolumeStatsResponse) -> list[tuple[int, int, int, int]]:
    return [(u.unit, u.total, u.available, u.used) for u in resp.usage]


Unit = csi_pb2.VolumeUsage.Unit


@pytest.mark.parametrize("where", ["target", "staging"])
def test_stats_of_a_mounted_volume(node: Node, where: str) -> None:
    vid = node.volume()
    node.stage(vid)
    node.publish(vid)
    resp = stats(node, vid, node.target() if where == "target" else node.staging())
    files = GiB // 16384
    assert usage(resp) == [(Unit.BYTES, GiB, GiB * 3 // 4, GiB // 4),
                           (Unit.INODES, files, files - 10, 10)]
    assert (resp.volume_condition.abnormal, resp.volume_condition.message) == \
        (False, "volume is healthy")


def test_stats_of_a_block_volume(node: Node) -> None:
    vid = node.volume(size=2 * GiB)
    node.stage(vid, kind="block")
    node.publish(vid, kind="block")
    resp = stats(node, vid, node.target())
    assert usage(resp) == [(Unit.BYTES, 2 * GiB, 0, 0)]
    assert not resp.volume_condition.abnormal


def test_stats_of_a_network_volume(node: Node) -> None:
    vid = node.volume("pvc-nfs", "shared")
    node.publish(vid)
    resp = stats(node, vid, node.target())
    assert usage(resp)[0] == (Unit.BYTES, 10 * GiB, 9 * GiB, GiB)
    assert (resp.volume_condition.abnormal, resp.volume_condition.message) == (False, "ok")


@pytest.mark.parametrize(("pool", "spoil", "message"), [
    pytest.param("local", lambda n, v: n.local.conditions.__setitem__(
        v, Condition(True, "image file is missing")), "image file is missing",
        id="pool-condition"),
    pytest.param("local", lambda n, v: n.system.deleted_backing.add(device(v)),
                 r"backing file of /dev/fake-\w+ was deleted", id="backing-file-deleted"),
    pytest.param("local", lambda n, v: n.system.broken.__setitem__(
        n.target(), "Input/output error"), "filesystem I/O error: Input/output error",
        id="io-error"),
    pytest.param("shared", lambda n, v: n.system.stale.add(n.target()),
                 r".*/mount does not answer: stale handle or server down", id="stale-nfs"),
])
def test_stats_report_an_abnormal_condition(node: Node, pool: str,
                                            spoil: Callable[[Node, str], Any],
                                            message: str) -> None:
    vid = node.volume(pool=pool)
    node.stage(vid)
    node.publish(vid)
    spoil(node, vid)
    resp = stats(node, vid, node.target())
    assert resp.volume_condition.abnormal
    assert re.fullmatch(message, resp.volume_condition.message)


STATS_ERRORS = [
    pytest.param(lambda n, v: (v, ""), Code.INVALID_ARGUMENT, r"^volume_path is required$",
                 id="no-path"),
    pytest.param(lambda n, v: ("", "/x"), Code.INVALID_ARGUMENT, r"^volume_id is required$",
                 id="no-volume-id"),
    pytest.param(lambda n, v: (MISSING, n.target()), Code.NOT_FOUND,
                 rf"^volume {MISSING} does not exist on node node-1$", id="missing-volume"),
    pytest.param(lambda n, v: (v, "pods/x/mount"), Code.NOT_FOUND,
                 r"^volume local:vol-\w+ is not available at 'pods/x/mount'$",
                 id="relative-path-is-not-found"),
    pytest.param(lambda n, v: (v, f"{n.root}/pods/../x"), Code.NOT_FOUND,
                 r"is not available at '.*/pods/../x'$", id="dotdot-is-not-found"),
    pytest.param(lambda n, v: (v, "/etc/passwd"), Code.INVALID_ARGUMENT,
                 r"^volume_path '/etc/passwd' is outside the allowed roots", id="outside"),
    pytest.param(lambda n, v: (v, n.target()), Code.NOT_FOUND,
                 r"^volume_path '.*/mount': directory .*/kubelet/pods does not exist$",
                 id="no-directory"),
    pytest.param(lambda n, v: (os.makedirs(n.target()), (v, n.target()))[1], Code.NOT_FOUND,
                 r"^volume local:vol-\w+ is not available at '.*/mount'$", id="not-mounted"),
    # the pool no longer knows the device under the mount (AttachedAccess.owns needs it):
    # NOT_FOUND, so stats' "volume is not attached on this node" condition is not reached
    pytest.param(lambda n, v: (_staged(n, v), n.local.attached.clear(), (v, n.staging()))[2],
                 Code.NOT_FOUND, r"^volume local:vol-\w+ is not available at "
                 "'.*/globalmount'$", id="device-gone-under-the-mount"),
    pytest.param(lambda n, v: (_staged(n, v), n.publish(v), (n.volume("pvc-2"), n.target()))[2],
                 Code.NOT_FOUND, r"^volume local:vol-\w+ is not available at '.*/mount'$",
                 id="another-volume-there"),
]


@pytest.mark.parametrize(("build", "code", "match"), STATS_ERRORS)
def test_stats_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    vid, path = build(node, node.volume())
    expect(code, match, node.svc.NodeGetVolumeStats,
           csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path))


# ---- NodeExpandVolume -------------------------------------------------------------------


def expand(n: Node, volume_id: str, path: str) -> int:
    return call(n.svc.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB))).capacity_bytes


@pytest.mark.parametrize(("fs_type", "kind"), [("ext4", "mount"), ("xfs", "mount"),
                                               ("", "block")])
def test_expand(node: Node, fs_type: str, kind: str) -> None:
    vid = node.volume(fs_type=fs_type)
    node.stage(vid, kind=kind, **({"fs_type": fs_type} if fs_type else {}))
    node.publish(vid, kind=kind)
    node.local.expand_volume(vid, 2 * GiB)  # ControllerExpandVolume's part
    assert expand(node, vid, node.target()) == 2 * GiB
    assert node.system.devices[device(vid)] == 2 * GiB, "the device was refreshed"
    grown = node.system.effects("grow_fs")
    if kind == "block":
        assert not grown
    else:
        assert grown[-1] == ("grow_fs", fs_type, device(vid), node.target())
        assert node.system.fs_bytes[device(vid)] == 2 * GiB


def test_expand_ext4_refused_online_succeeds_and_grows_at_the_next_stage(node: Node) -> None:
    vid = node.volume()
    node.stage(vid)
    node.local.expand_volume(vid, 2 * GiB)
    node.system.fail["grow_fs"] = CommandFailed(
        ["resize2fs"], 1, "resize2fs: Permission denied to resize filesystem")
    assert expand(node, vid, node.staging()) == 2 * GiB
    assert node.system.fs_bytes[device(vid)] == GiB
    node.unstage(vid)
    node.stage(vid)
    assert node.system.effects("grow_fs")[-1] == ("grow_fs", "ext4", device(vid), None)
    assert node.system.fs_bytes[device(vid)] == 2 * GiB


def test_expand_network_volume(node: Node) -> None:
    vid = node.volume("pvc-nfs", "shared")
    node.publish(vid)
    node.shared.expand_volume(vid, 2 * GiB)
    assert expand(node, vid, node.target()) == 2 * GiB
    assert not node.system.effects("grow_fs")


EXPAND_ERRORS = [
    pytest.param(lambda n, v: (v, ""), Code.INVALID_ARGUMENT, r"^volume_path is required$",
                 id="no-path"),
    pytest.param(lambda n, v: (MISSING, n.staging()), Code.NOT_FOUND,
                 rf"^volume {MISSING} does not exist on node node-1$", id="missing-volume"),
    pytest.param(lambda n, v: (n.volume("pvc-2"), n.staging()), Code.NOT_FOUND,
                 r"^volume local:vol-\w+ is not available at '.*/globalmount'$",
                 id="another-volume-there"),
    pytest.param(lambda n, v: (n.hold(v), (v, n.staging()))[1], Code.ABORTED,
                 r"^an operation on 'local:vol-\w+' is already in progress", id="busy"),
    pytest.param(lambda n, v: (n.system.fail.__setitem__("grow_fs", CommandFailed(
        ["resize2fs"], 1, "resize2fs: No space left on device")), (v, n.staging()))[1],
        Code.INTERNAL, r"^resize2fs exited 1: resize2fs: No space left on device$",
        id="growth-fails"),
    pytest.param(lambda n, v: (n.system.table.__setitem__(0, _with_fstype(n.system.table[0],
                                                                          "btrfs")),
                               (v, n.staging()))[1],
                 Code.FAILED_PRECONDITION, r"^cannot grow a btrfs filesystem$",
                 id="unknown-filesystem"),
]


def _with_fstype(m: MountInfo, fstype: str) -> MountInfo:
    return MountInfo(m.mount_id, m.major_minor, m.root, m.mount_point, m.options, fstype,
                     m.source, m.super_options)


@pytest.mark.parametrize(("build", "code", "match"), EXPAND_ERRORS)
def test_expand_refusals(node: Node, build: Build, code: Code, match: str) -> None:
    vid = node.volume()
    node.stage(vid)
    volume_id, path = build(node, vid)
    expect(code, match, node.svc.NodeExpandVolume,
           csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path))


# ---- info -------------------------------------------------------------------------------


def test_node_info_and_capabilities(node: Node) -> None:
    info = call(node.svc.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    assert (info.node_id, info.max_volumes_per_node) == (NODE, 16)
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE}
    caps = call(node.svc.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest())
    Cap = csi_pb2.NodeServiceCapability.RPC.Type
    assert {c.rpc.type for c in caps.capabilities} == {
        Cap.STAGE_UNSTAGE_VOLUME, Cap.GET_VOLUME_STATS, Cap.EXPAND_VOLUME,
        Cap.VOLUME_CONDITION}
