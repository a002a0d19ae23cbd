"""Shared set-up for the reliability tier: a driver on a loop-mounted XFS pool that can be
killed and restarted, and invariant checks over the pool directory."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.helpers import DriverProcess, GiB, loop_filesystem


@dataclass
class Rig:
    workdir: Path
    fs: Path
    pool: Path
    root: Path
    driver: DriverProcess

    def metas(self, kind: str = "volumes") -> list[dict[str, object]]:
        found = []
        for p in sorted((self.pool / kind).glob("*.json")):
            with contextlib.suppress(FileNotFoundError):  # deleted while we look
                found.append(json.loads(p.read_text()))
        return found

    def named(self, name: str, kind: str = "volumes") -> list[dict[str, object]]:
        return [m for m in self.metas(kind) if m["name"] == name]

    def leftovers(self) -> list[str]:
        found = [str(p) for p in (self.pool / "tmp").iterdir()]
        for kind in ("volumes", "snapshots"):
            names = {p.name for p in (self.pool / kind).iterdir()}
            for n in names:
                if n.endswith(".img") and n[:-4] + ".json" not in names:
                    found.append(f"orphan image {kind}/{n}")
                if n.endswith(".json") and n[:-5] + ".img" not in names:
                    found.append(f"metadata without image {kind}/{n}")
                if not n.endswith((".img", ".json")):
                    found.append(f"stray {kind}/{n}")
        return found

    def image(self, object_id: str) -> Path:
        kind = "volumes" if ":vol-" in object_id else "snapshots"
        return self.pool / kind / (object_id.split("-", 1)[1] + ".img")

    def digest(self, object_id: str) -> str:
        h = hashlib.sha256()
        with open(self.image(object_id), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


@pytest.fixture
def rig(workdir: Path) -> Iterator[Rig]:
    require_root()
    with loop_filesystem(workdir, "xfs", size=16 * GiB, name="host") as fs:
        root = workdir / "kubelet"
        root.mkdir()
        driver = DriverProcess(workdir, [{"name": "p", "type": "filepool",
                                          "path": str(fs / "pool")}],
                               allowed_roots=[str(root)])
        rig = Rig(workdir, fs, fs / "pool", root, driver)
        try:
            yield rig
        finally:
            driver.stop()
