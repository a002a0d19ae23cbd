"""``flotillactl backup`` against a directory target (no root, no driver)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from csi.backup import engine
from csi.backup.engine import Manifest
from csi.backup.targets import DirTarget
from csi.cli import main
from tests.conftest import require_root

MiB = 1 << 20


def test_backup_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = DirTarget("nas", str(tmp_path / "target"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "pools": [{"name": "p", "type": "filepool", "path": str(tmp_path / "pool")}],
        "backup_targets": [{"name": "nas", "type": "dir", "path": str(target.path)}]}))
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
        f.write(os.urandom(6 * MiB))
    for i in range(3):
        m = Manifest(id=f"p:snap-{i}", size=32 * MiB, chunks=[], source_volume_id="p:vol-1",
                     created=1000.0 + i)
        engine.backup_image(target, str(img), m, "t")
    cli = ["backup", "--config", str(config)]

    assert main([*cli, "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("p:vol-1") == 3 and "32.0 MiB" in out
    assert main([*cli, "inspect", "p:snap-1"]) == 0
    assert '"chunks": 2' in capsys.readouterr().out
    assert main([*cli, "verify", "--all"]) == 0
    assert capsys.readouterr().out.count("OK ") == 3

    dest = tmp_path / "restored.img"
    assert main([*cli, "restore", "p:snap-2", "--to", str(dest)]) == 0
    assert hashlib.sha256(dest.read_bytes()).digest() == \
        hashlib.sha256(img.read_bytes()).digest()
    assert main([*cli, "restore", "p:snap-2", "--to", str(dest)]) == 1  # never overwrites
    assert "exists" in capsys.readouterr().err

    assert main([*cli, "prune", "--keep-last", "1", "--dry-run"]) == 0
    assert len(engine.list_manifests(target)) == 3
    assert main([*cli, "prune", "--keep-last", "1"]) == 0
    assert [m.id for m in engine.list_manifests(target)] == ["p:snap-2"]
    assert main([*cli, "gc"]) == 0
    assert "deleted 0 unreferenced chunks" in capsys.readouterr().out

    # a bad chunk makes verify fail and names it
    key = next(iter(target.list("chunks/"))).key
    (Path(target.path) / key).write_bytes(b"garbage")
    assert main([*cli, "verify", "p:snap-2"]) == 1
    assert "BAD" in capsys.readouterr().out
    assert main([*cli, "--target", "nope", "list"]) == 1


def test_backup_cli_restores_onto_a_block_device(workdir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A device is overwritten whole (holes as zeros) after every chunk was checked."""
    require_root()
    target = DirTarget("nas", str(workdir / "target"))
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "pools": [{"name": "p", "type": "filepool", "path": str(workdir / "pool")}],
        "backup_targets": [{"name": "nas", "type": "dir", "path": str(target.path)}]}))
    img = workdir / "v.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    engine.backup_image(target, str(img), Manifest(id="p:snap-d", size=16 * MiB, chunks=[]),
                        "t")
    disk = workdir / "disk.img"
    disk.write_bytes(os.urandom(16 * MiB))  # old content everywhere
    dev = subprocess.run(["losetup", "--find", "--show", str(disk)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        assert main(["backup", "--config", str(config), "restore", "p:snap-d",
                     "--to", dev]) == 0
        with open(dev, "rb") as f:
            assert hashlib.sha256(f.read()).digest() == \
                hashlib.sha256(img.read_bytes()).digest()
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)
    assert "restored p:snap-d" in capsys.readouterr().out
