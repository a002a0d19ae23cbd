from __future__ import annotations

import pytest

from csi._proto import csi_pb2
from csi.errors import InvalidArgument, OutOfRange
from csi.validation import (
    MAX_VOLUME_BYTES,
    check_id,
    check_name,
    check_path,
    read_capabilities,
    resolve_size,
)
from tests.helpers import GiB, MiB, block_cap, mount_cap


@pytest.mark.parametrize("name", ["", "x" * 129, "a\0b", "line\nbreak"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(name)


def test_name_limit_is_bytes_not_characters() -> None:
    check_name("é" * 64)  # 128 bytes
    with pytest.raises(InvalidArgument, match="129 bytes"):
        check_name("é" * 64 + "x")


@pytest.mark.parametrize("vid", ["a/b", "..", "x..y", "/etc/passwd", "a\0", ""])
def test_bad_ids(vid: str) -> None:
    with pytest.raises(InvalidArgument):
        check_id(vid)


def test_paths_must_stay_inside_roots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "kubelet"
    root.mkdir()
    assert check_path(str(root / "pods" / "x"), [str(root)], "target_path") == str(
        root / "pods" / "x")
    for bad, why in [("relative/path", "absolute"), (str(root / ".." / "etc"), "'..'"),
                     ("/etc/shadow", "outside the allowed roots"),
                     (str(root) + "-sibling/x", "outside the allowed roots"),
                     (str(root / "a\0b"), "control character"),
                     (str(root / ("x" * 256)), "component of 256 bytes"),
                     ("/proc/1/root" + str(root / "x"), "outside the allowed roots")]:
        with pytest.raises(InvalidArgument, match=why):
            check_path(bad, [str(root)], "target_path")
    # links are refused where the path is resolved: tests/unit/test_node_paths.py


def test_capabilities() -> None:
    caps = read_capabilities([mount_cap("xfs", flags=("noatime",))])
    assert caps.mount and not caps.block and caps.fs_type == "xfs"
    assert caps.mount_flags == ("noatime",)
    assert read_capabilities([block_cap()]).block
    with pytest.raises(InvalidArgument, match="required"):
        read_capabilities([])
    with pytest.raises(InvalidArgument, match="not both"):
        read_capabilities([mount_cap(), block_cap()])
    with pytest.raises(InvalidArgument, match="not supported"):
        read_capabilities([mount_cap("ntfs")])
    with pytest.raises(InvalidArgument, match="access_mode"):
        read_capabilities([mount_cap(mode=0)])
    with pytest.raises(InvalidArgument, match="access_type"):
        read_capabilities([csi_pb2.VolumeCapability(
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=1))])
    ro = read_capabilities([mount_cap(mode=2)])
    assert ro.read_only and not ro.multi_node
    assert read_capabilities([mount_cap(mode=5)]).multi_node


def test_resolve_size() -> None:
    assert resolve_size(0, 0, GiB, MiB, MiB) == GiB  # unspecified: the default
    assert resolve_size(0, 512 * MiB, GiB, MiB, MiB) == 512 * MiB
    assert resolve_size(1, 0, GiB, MiB, MiB) == MiB  # rounded up
    assert resolve_size(10 * MiB + 1, 0, GiB, MiB, MiB) == 11 * MiB
    assert resolve_size(0, 0, GiB, 300 * MiB, MiB) == GiB
    assert resolve_size(5 * MiB, 0, GiB, 300 * MiB, MiB) == 300 * MiB  # fs minimum
    assert resolve_size(MiB + 1, MiB + 100, GiB, MiB, MiB) == MiB + 100  # within range
    for required, limit in [(-1, 0), (0, -1), (2 * MiB, MiB), (MAX_VOLUME_BYTES + 1, 0),
                            (2**63 - 1, 0), (0, 100 * MiB)]:
        with pytest.raises(OutOfRange):
            resolve_size(required, limit, GiB, 300 * MiB, MiB)
