"""Measure an nfs snapshot of a volume holding 1 GiB: server-side CLONE versus the copy
fallback (run inside the VM tier's guest; prints and writes JSON). A measurement, not a
test: the VM tier prints it; BENCHMARKS.md / the closing note carry the figures."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from csi.pools import build_pool
from csi.pools.base import VolumeRequest
from csi.system import System

GiB = 1 << 30


def main(out: str) -> None:
    server, share = os.environ["FLOTILLA_NFS_SERVER"], os.environ["FLOTILLA_NFS_SHARE"]
    export_dir = Path(os.environ["FLOTILLA_NFS_EXPORT_DIR"]) / "timing"
    export_dir.mkdir()
    spec = {"name": "timing", "type": "nfs", "server": server,
            "share": share.rstrip("/") + "/timing", "mount_dir": "/run/flotilla-timing"}
    results: dict[str, object] = {}
    pool = build_pool(spec, System())
    pool.start()
    try:
        vol = pool.create_volume(VolumeRequest(name="one-gib", size=2 * GiB, required=0,
                                               limit=0, fs_type="", block=False))
        # written on the server side: the export is local to the guest
        data = export_dir / "volumes" / vol.id.split("-", 1)[1] / "data.bin"
        block = os.urandom(1 << 20)
        with open(data, "wb") as f:
            for _ in range(1024):
                f.write(block)
            os.fsync(f.fileno())
        for mode in ("auto", "copy"):
            pool.stop()
            pool = build_pool({**spec, "clone": mode}, System())
            pool.start()
            started = time.monotonic()
            pool.create_snapshot(f"snap-{mode}", vol.id, {})
            seconds = time.monotonic() - started
            extra = pool.capacity().extra
            results[mode] = {"seconds": round(seconds, 3),
                             "cloned_files": extra["flotilla_nfs_cloned_files"],
                             "copied_files": extra["flotilla_nfs_copied_files"]}
            print(f"snapshot of 1 GiB with clone={mode}: {seconds:.3f} s {results[mode]}",
                  flush=True)
        auto, copy = results["auto"], results["copy"]
        assert isinstance(auto, dict) and isinstance(copy, dict)
        results["copy_over_clone"] = round(copy["seconds"] / max(auto["seconds"], 1e-6), 1)
    finally:
        pool.stop()
    Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
