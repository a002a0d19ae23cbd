"""System.node_path: a caller's path is resolved beneath its allowed root without
following any link, and the operations on it act on exactly that place. No root needed."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from csi.system import System


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An allowed root with a pods/ directory, and an outside directory with a file."""
    root = tmp_path / "kubelet"
    (root / "pods").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("x")
    yield root, outside


def resolve(root: Path, path: str | Path) -> object:
    return System().node_path(str(path), [str(root)], "target_path")


def outside_unchanged(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "x"


@pytest.mark.parametrize("link", ["absolute", "relative", "dangling", "loop", "self"])
def test_a_link_as_last_component_is_never_followed(tree: tuple[Path, Path],
                                                    link: str) -> None:
    root, outside = tree
    target = root / "pods" / "t"
    to = {"absolute": str(outside), "relative": "../../outside",
          "dangling": str(outside / "new"), "loop": "t2", "self": "t"}[link]
    target.symlink_to(to)
    if link == "loop":
        (root / "pods" / "t2").symlink_to("t")
    s = System()
    with s.node_path(str(target), [str(root)], "target_path") as p:
        assert p.real == str(target)
        assert stat.S_ISLNK(s.lstat(p).st_mode)  # type: ignore[union-attr]
        with pytest.raises(InvalidArgument, match="is a symbolic link; it must be a directory"):
            s.make_dir(p)
        with pytest.raises(InvalidArgument, match="is a symbolic link"):
            s.make_file(p)
        with pytest.raises(InvalidArgument, match="is a symbolic link"):
            s.fstatvfs(p)
        s.remove(p)  # the link itself goes, never what it points to
    assert not os.path.lexists(target)
    outside_unchanged(outside)


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_a_link_on_the_way_is_refused(tree: tuple[Path, Path], link: str) -> None:
    root, outside = tree
    (root / "pods" / "uid").symlink_to(str(outside) if link == "absolute"
                                       else "../../outside")
    with pytest.raises(InvalidArgument, match="passes through the symbolic link"), \
            resolve(root, root / "pods" / "uid" / "mount"):  # type: ignore[attr-defined]
        pass
    outside_unchanged(outside)


def test_a_link_to_the_root_itself_is_refused(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "pods" / "up").symlink_to(str(root))
    with pytest.raises(InvalidArgument, match="symbolic link"), \
            resolve(root, root / "pods" / "up" / "pods" / "x"):  # type: ignore[attr-defined]
        pass


def test_a_root_spelled_through_a_link_resolves_to_its_real_directory(
        tmp_path: Path) -> None:
    real = tmp_path / "data"
    (real / "pods").mkdir(parents=True)
    spelled = tmp_path / "kubelet"
    spelled.symlink_to(real)
    with System().node_path(str(spelled / "pods" / "x"), [str(spelled)], "target_path") as p:
        assert p.real == str(real / "pods" / "x")
        assert p.root == str(real)


@pytest.mark.parametrize(("path", "error", "match"), [
    ("/etc/x", InvalidArgument, "outside the allowed roots"),
    ("{root}", InvalidArgument, "an allowed root itself"),
    ("{root}/missing/x", NotFound, "does not exist"),
    ("{root}/file/x", InvalidArgument, "is a regular file, not a directory"),
])
def test_bad_places(tree: tuple[Path, Path], path: str, error: type[Exception],
                    match: str) -> None:
    root, _ = tree
    (root / "file").write_text("")
    with pytest.raises(error, match=match), \
            resolve(root, path.format(root=root)):  # type: ignore[attr-defined]
        pass
    assert not (root / "missing").exists()


def test_special_files_are_never_opened(tree: tuple[Path, Path]) -> None:
    """A FIFO would block an open() forever, a socket cannot be opened: both are refused
    by their type, without opening them."""
    root, _ = tree
    fifo = root / "pods" / "fifo"
    os.mkfifo(fifo)
    sock_path = root / "pods" / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    s = System()
    try:
        for special, kind in ((fifo, "a FIFO"), (sock_path, "a socket")):
            with s.node_path(str(special), [str(root)], "target_path") as p:
                with pytest.raises(AlreadyExists, match=f"is {kind}; it must be a regular"):
                    s.make_file(p)
                with pytest.raises(AlreadyExists, match=f"is {kind}; it must be a directory"):
                    s.make_dir(p)
                with pytest.raises(InvalidArgument, match=f"is {kind}; a volume is mounted"):
                    s.fstatvfs(p)
    finally:
        sock.close()


def test_make_and_remove(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    s = System()
    with s.node_path(str(root / "pods" / "d"), [str(root)], "target_path") as p:
        s.make_dir(p)
        s.make_dir(p)  # idempotent
        assert (root / "pods" / "d").is_dir()
        (root / "pods" / "d" / "data").write_text("keep")
        with pytest.raises(FailedPrecondition, match="not empty"):
            s.remove(p)
        assert (root / "pods" / "d" / "data").read_text() == "keep"
    with s.node_path(str(root / "pods" / "f"), [str(root)], "target_path") as p:
        s.make_file(p)
        s.make_file(p)
        assert (root / "pods" / "f").is_file()
        s.remove(p)
        s.remove(p)  # gone already: fine
        assert not (root / "pods" / "f").exists()


def test_a_directory_replaced_after_resolution_does_not_redirect(
        tree: tuple[Path, Path]) -> None:
    """The parent is held open: renaming it away and putting a link in its place while a
    call runs leaves the call acting where it was checked."""
    root, outside = tree
    (root / "pods" / "uid").mkdir()
    s = System()
    with s.node_path(str(root / "pods" / "uid" / "t"), [str(root)], "target_path") as p:
        os.rename(root / "pods" / "uid", root / "pods" / "moved")
        (root / "pods" / "uid").symlink_to(outside)
        s.make_dir(p)
    assert (root / "pods" / "moved" / "t").is_dir()
    outside_unchanged(outside)
