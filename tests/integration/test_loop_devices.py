"""Loop devices attached from another mount namespace (a node plugin container that has
since been replaced) are still found by their backing image: sysfs names such a file as
the attaching namespace saw it, so the driver must not trust that path alone. Found on a
real kubelet, where the restarted node plugin refused every unpublish of the volumes its
predecessor had staged (and would have attached a second loop to a mounted image)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.system import System
from tests.conftest import require_root

pytestmark = pytest.mark.root


@pytest.fixture
def foreign_loop(workdir: Path) -> Iterator[tuple[Path, str]]:
    """An image under `workdir`, attached to a loop device from a private mount namespace
    that saw `workdir` at /mnt (the namespace is gone when the fixture yields)."""
    require_root()
    image = workdir / "vol.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount --bind {workdir} /mnt && losetup --find --show /mnt/vol.img"],
        check=True, capture_output=True, text=True).stdout.strip()
    assert out.startswith("/dev/loop"), out
    try:
        yield image, out
    finally:
        subprocess.run(["losetup", "--detach", out], check=False)


def test_a_loop_attached_in_another_mount_namespace_is_found(
        foreign_loop: tuple[Path, str]) -> None:
    image, device = foreign_loop
    backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    assert backing != str(image), "the kernel named the host path: nothing to prove here"
    system = System()
    assert system.loop_backed_by(device, str(image))
    assert system.loop_devices_for(str(image)) == [device]
    # attaching again finds it instead of putting a second loop on the same image
    assert system.loop_attach(str(image)) == device
    assert system.loop_devices_for(str(image)) == [device]


def test_another_image_with_the_same_path_inside_is_not_taken_for_it(
        foreign_loop: tuple[Path, str], workdir: Path) -> None:
    """The foreign loop's path (`/mnt/vol.img` or `/vol.img`) names nothing of ours: an
    unrelated image is not matched through it."""
    _, device = foreign_loop
    other = workdir / "other.img"
    with open(other, "wb") as f:
        f.truncate(16 << 20)
    system = System()
    assert not system.loop_backed_by(device, str(other))
    assert device not in system.loop_devices_for(str(other))
