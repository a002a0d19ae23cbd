"""host-path's snapshot mechanism, timed directly (used only when the peer cannot run).

csi-driver-host-path takes a snapshot of a filesystem volume by running
``tar czf <statedir>/<snapshot-id>.snap -C <volume dir> .`` and restores it into a new
volume with ``tar zxvf <snapshot> -C <new volume dir>`` (its ``hostpath.go``). This module
runs those same two commands on the same data sizes, in a directory on the host file
system (where host-path keeps its volumes), so that Flotilla's snapshot latency can be
set against the cost of that mechanism. It is *not* a measurement of the driver: it has
no gRPC, no state file and no locking, so the driver can only be slower than this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from bench.csibench import SNAPSHOT_SIZES, human_size, write_random_file
from bench.stats import summarize


def tar_snapshot_reference(root: str, sizes: tuple[int, ...] = SNAPSHOT_SIZES,
                           min_reps: int = 3, max_reps: int = 20, budget_s: float = 20.0,
                           log: Callable[[str], None] = print,
                           large_min_reps: int = 2) -> dict[str, Any]:
    """Time the two tar commands per size: ``min_reps`` runs at least (``large_min_reps``
    from 1 GiB up, where one gzip pass takes about a minute), more while ``budget_s``
    lasts, at most ``max_reps``."""
    out: dict[str, Any] = {
        "what": "tar czf / tar zxvf of the volume directory, as host-path's CreateSnapshot "
                "and its restore run them; timed outside any driver",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "sizes": {},
    }
    os.makedirs(root, exist_ok=True)
    try:
        for size in sizes:
            label = human_size(size)
            vol = os.path.join(root, f"vol-{label}")
            os.makedirs(vol)
            t0 = time.monotonic()
            write_random_file(os.path.join(vol, "data.bin"), size)
            write_s = time.monotonic() - t0
            os.sync()
            snaps: list[float] = []
            restores: list[float] = []
            snap_bytes = 0
            start = time.monotonic()
            rep = 0
            least = min(min_reps, large_min_reps) if size >= 1 << 30 else min_reps
            while rep < max_reps and (rep < least or time.monotonic() - start < budget_s):
                snap = os.path.join(root, f"snap-{label}-{rep}.snap")
                t0 = time.perf_counter()
                subprocess.run(["tar", "czf", snap, "-C", vol, "."], check=True,
                               capture_output=True)
                snaps.append(time.perf_counter() - t0)
                snap_bytes = os.path.getsize(snap)
                dest = os.path.join(root, f"restore-{label}-{rep}")
                os.makedirs(dest)
                t0 = time.perf_counter()
                subprocess.run(["tar", "zxvf", snap, "-C", dest], check=True,
                               capture_output=True)
                restores.append(time.perf_counter() - t0)
                os.unlink(snap)
                shutil.rmtree(dest)
                rep += 1
            shutil.rmtree(vol)
            out["sizes"][label] = {"data_bytes": size, "write_s": round(write_s, 2),
                                   "archive_bytes": snap_bytes,
                                   "snapshot": summarize(snaps),
                                   "restore": summarize(restores)}
            log(f"[reference] tar snapshot {label}: {rep} runs, p50 "
                f"{out['sizes'][label]['snapshot']['p50_ms']:.0f} ms, restore p50 "
                f"{out['sizes'][label]['restore']['p50_ms']:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out
