"""A driver-agnostic CSI load generator.

It talks to any CSI endpoint through the project's generated stubs, runs the same
workload against it, and returns (or writes) one JSON-serialisable result:

* ``probe``           Probe latency, sequential;
* ``create_delete``   CreateVolume + DeleteVolume pairs at concurrency 1, 8, 32;
* ``lifecycle``       create -> stage -> publish -> unpublish -> unstage -> delete
                      (mount access type; stage/unstage only if the node advertises it);
* ``snapshot``        CreateSnapshot and restore (CreateVolume from the snapshot) latency
                      against the data written into the volume;
* ``list_volumes``    paginated ListVolumes with 1,000 volumes existing;
* ``memory``          the driver's resident memory idle and the peak under each phase.

The client behaves like kubelet where CSI leaves a step to the CO: it creates the staging
directory and the target's parent directory, and removes the staging directory after
NodeUnstageVolume. Nothing here knows which driver it talks to.

Run standalone: ``python -m bench.csibench --endpoint unix:///PATH --workdir DIR
--pid PID --out result.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.stats import median, summarize
from csi._proto import csi_pb2, csi_pb2_grpc

MiB = 1 << 20
GiB = 1 << 30
SNAPSHOT_SIZES = (1 * MiB, 256 * MiB, 1 * GiB, 4 * GiB)
CONCURRENCY = (1, 8, 32)
RPC_TIMEOUT = 900.0  # a host-path snapshot of 4 GiB is a tar+gzip of 4 GiB

CtlCap = csi_pb2.ControllerServiceCapability.RPC.Type
NodeCap = csi_pb2.NodeServiceCapability.RPC.Type


def human_size(n: int) -> str:
    return f"{n // GiB}GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB}MiB"


def mount_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )


# ---- resource sampling -------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    """VmRSS of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class RssSampler:
    """Samples the driver's RSS every ``interval`` seconds; reports the peak per phase."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


# ---- the client --------------------------------------------------------------------

@dataclass
class Phase:
    """What one workload phase cost the driver: wall time, CPU, peak RSS, load."""

    name: str
    wall_s: float = 0.0
    driver_cpu_s: float = 0.0
    rss_peak_mb: float = 0.0
    loadavg_start: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "driver_cpu_s": round(self.driver_cpu_s, 3),
                "rss_peak_mb": round(self.rss_peak_mb, 1),
                "loadavg_start": [round(x, 2) for x in self.loadavg_start]}


class Bench:
    def __init__(self, endpoint: str, workdir: str, pid: int, label: str = "driver",
                 log: Callable[[str], None] = print,
                 diagnose: Callable[[str], dict[str, Any]] | None = None) -> None:
        self.endpoint = endpoint
        self.workdir = os.path.abspath(workdir)
        self.pid = pid
        self.label = label
        self.log = log
        self.channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.max_receive_message_length", 64 * MiB)])
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.run_id = uuid.uuid4().hex[:8]
        self.phases: dict[str, Phase] = {}
        self.errors: dict[str, list[str]] = {}
        self._error_lock = threading.Lock()
        self.retries: dict[str, int] = {}
        #: a driver-specific hook called with the error text of each retried call
        self.diagnose = diagnose
        self.diagnoses: list[dict[str, Any]] = []
        ctl = self.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30)
        self.ctl_caps = {c.rpc.type for c in ctl.capabilities}
        node = self.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=30)
        self.node_caps = {c.rpc.type for c in node.capabilities}
        self.uses_stage = NodeCap.STAGE_UNSTAGE_VOLUME in self.node_caps
        self.plugin = self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)

    def close(self) -> None:
        self.channel.close()

    # ---- helpers --------------------------------------------------------------------

    def name(self, kind: str, *parts: object) -> str:
        return "-".join(["bench", self.run_id, kind, *(str(p) for p in parts)])

    def record_error(self, phase: str, err: BaseException) -> None:
        text = (f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError)
                and hasattr(err, "code") else repr(err))
        with self._error_lock:
            errs = self.errors.setdefault(phase, [])
            if len(errs) < 20:
                errs.append(text)
            else:
                errs[-1] = f"... and more; last: {text}"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        ph = Phase(name, loadavg_start=list(os.getloadavg()))
        cpu0 = cpu_seconds(self.pid)
        t0 = time.monotonic()
        self.log(f"[{self.label}] {name} ...")
        with RssSampler(self.pid) as sampler:
            yield ph
        ph.wall_s = time.monotonic() - t0
        ph.driver_cpu_s = cpu_seconds(self.pid) - cpu0
        ph.rss_peak_mb = sampler.peak / MiB
        self.phases[name] = ph
        self.log(f"[{self.label}] {name}: {ph.wall_s:.1f} s, driver CPU "
                 f"{ph.driver_cpu_s:.1f} s, peak RSS {ph.rss_peak_mb:.1f} MiB")

    @staticmethod
    def concurrently(count: int, concurrency: int, fn: Callable[[int], None]) -> float:
        """Call ``fn(0..count-1)`` from ``concurrency`` threads; returns the wall time."""
        counter = itertools.count()
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter)
                if i >= count:
                    return
                fn(i)

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [pool.submit(worker) for _ in range(concurrency)]
            for fut in futures:
                fut.result()
        return time.monotonic() - t0

    def create_volume(self, name: str, size: int,
                      source: csi_pb2.VolumeContentSource | None = None) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability()])
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        vol: csi_pb2.Volume = self.controller.CreateVolume(req, timeout=RPC_TIMEOUT).volume
        return vol

    def delete_volume(self, volume_id: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                     timeout=RPC_TIMEOUT)

    def delete_retrying(self, volume_id: str, phase: str, attempts: int = 50,
                        backoff: float = 0.02) -> None:
        """DeleteVolume as a CO does it: FAILED_PRECONDITION / ABORTED are retried.

        Each retry is counted (and the first error kept) so the report can show it.
        """
        for attempt in range(attempts):
            try:
                self.delete_volume(volume_id)
                return
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                retriable = code in (grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.ABORTED)
                if not retriable or attempt == attempts - 1:
                    raise
                with self._error_lock:
                    self.retries[phase] = self.retries.get(phase, 0) + 1
                if self.retries[phase] == 1:
                    self.record_error(phase + "_retried", err)
                if self.diagnose is not None and attempt == 0 and len(self.diagnoses) < 50:
                    found = self.diagnose(str(err.details()))
                    if found:
                        self.diagnoses.append({"phase": phase, **found})
                time.sleep(backoff * (attempt + 1))

    def paths(self, name: str) -> tuple[str, str]:
        staging = os.path.join(self.workdir, "staging", name)
        target = os.path.join(self.workdir, "pods", name, "mount")
        return staging, target

    def stage(self, vol: csi_pb2.Volume, staging: str) -> None:
        if not self.uses_stage:
            return
        os.makedirs(staging, exist_ok=True)
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging,
            volume_capability=mount_capability(), volume_context=vol.volume_context),
            timeout=RPC_TIMEOUT)

    def publish(self, vol: csi_pb2.Volume, staging: str, target: str) -> None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target,
            volume_capability=mount_capability(), volume_context=vol.volume_context)
        if self.uses_stage:
            req.staging_target_path = staging
        self.node.NodePublishVolume(req, timeout=RPC_TIMEOUT)

    def unpublish(self, volume_id: str, target: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=RPC_TIMEOUT)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(target))

    def unstage(self, volume_id: str, staging: str) -> None:
        if not self.uses_stage:
            return
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging), timeout=RPC_TIMEOUT)
        with contextlib.suppress(OSError):
            os.rmdir(staging)

    # ---- workloads ------------------------------------------------------------------

    def probe(self, count: int = 2000, warmup: int = 100) -> dict[str, Any]:
        req = csi_pb2.ProbeRequest()
        for _ in range(warmup):
            self.identity.Probe(req, timeout=30)
        samples = []
        with self.phase("probe"):
            for _ in range(count):
                t0 = time.perf_counter()
                resp = self.identity.Probe(req, timeout=30)
                samples.append(time.perf_counter() - t0)
        ready = not resp.HasField("ready") or resp.ready.value
        return {"latency": summarize(samples), "ready": ready}

    def idle_rss(self, settle: float = 5.0) -> dict[str, Any]:
        """RSS after ``settle`` seconds without calls: min and max of 1 s samples."""
        samples = []
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            samples.append(rss_bytes(self.pid))
            time.sleep(0.5)
        return {"rss_mib": round(samples[-1] / MiB, 1),
                "rss_min_mib": round(min(samples) / MiB, 1),
                "rss_max_mib": round(max(samples) / MiB, 1), "settle_s": settle}

    def create_delete(self, concurrency: int, pairs: int, rounds: int,
                      size: int = 64 * MiB) -> dict[str, Any]:
        creates: list[float] = []
        deletes: list[float] = []
        throughputs: list[float] = []
        failures = 0
        key = f"create_delete_c{concurrency}"

        def one(r: int, i: int) -> None:
            nonlocal failures
            name = self.name("cd", concurrency, r, i)
            try:
                t0 = time.perf_counter()
                vol = self.create_volume(name, size)
                t1 = time.perf_counter()
                self.delete_volume(vol.volume_id)
                t2 = time.perf_counter()
            except grpc.RpcError as err:
                failures += 1
                self.record_error(key, err)
                return
            creates.append(t1 - t0)
            deletes.append(t2 - t1)

        with self.phase(key):
            for r in range(rounds):
                wall = self.concurrently(pairs, concurrency, functools.partial(one, r))
                throughputs.append(pairs / wall)
        return {
            "concurrency": concurrency, "pairs_per_round": pairs, "rounds": rounds,
            "pairs_per_s": round(median(throughputs), 2),
            "pairs_per_s_rounds": [round(t, 2) for t in throughputs],
            "create": summarize(creates), "delete": summarize(deletes), "failures": failures,
        }

    def lifecycle(self, concurrency: int, volumes: int, rounds: int,
                  size: int = 1 * GiB) -> dict[str, Any]:
        steps: dict[str, list[float]] = {k: [] for k in (
            "create", "stage", "publish", "unpublish", "unstage", "delete")}
        totals: list[float] = []
        throughputs: list[float] = []
        failures = 0
        key = f"lifecycle_c{concurrency}"

        def one(r: int, i: int) -> None:
            nonlocal failures
            name = self.name("lc", concurrency, r, i)
            staging, target = self.paths(name)
            times: dict[str, float] = {}
            t_start = time.perf_counter()

            def timed(step: str, fn: Callable[[], object]) -> None:
                t0 = time.perf_counter()
                fn()
                times[step] = time.perf_counter() - t0

            vol: csi_pb2.Volume | None = None
            try:
                t0 = time.perf_counter()
                vol = self.create_volume(name, size)
                times["create"] = time.perf_counter() - t0
                v = vol
                if self.uses_stage:
                    timed("stage", lambda: self.stage(v, staging))
                timed("publish", lambda: self.publish(v, staging, target))
                timed("unpublish", lambda: self.unpublish(v.volume_id, target))
                if self.uses_stage:
                    timed("unstage", lambda: self.unstage(v.volume_id, staging))
                timed("delete", lambda: self.delete_retrying(v.volume_id, key))
            except grpc.RpcError as err:
                failures += 1
                self.record_error(key, err)
                if vol is not None:
                    self.teardown(vol.volume_id, staging, target)
                return
            totals.append(time.perf_counter() - t_start)
            for step, took in times.items():
                steps[step].append(took)

        with self.phase(key):
            for r in range(rounds):
                done = len(totals)
                wall = self.concurrently(volumes, concurrency, functools.partial(one, r))
                throughputs.append((len(totals) - done) / wall)
        return {
            "concurrency": concurrency, "volumes_per_round": volumes, "rounds": rounds,
            "delete_retries": self.retries.get(key, 0),
            "size_bytes": size, "staged": self.uses_stage,
            "volumes_per_s": round(median(throughputs), 3),
            "volumes_per_s_rounds": [round(t, 3) for t in throughputs],
            "lifecycle": summarize(totals),
            "steps": {k: summarize(v) for k, v in steps.items() if v},
            "failures": failures,
        }

    def teardown(self, volume_id: str, staging: str, target: str) -> None:
        """Best effort: undo whatever part of a lifecycle happened."""
        steps: list[Callable[[], None]] = [
            lambda: self.unpublish(volume_id, target),
            lambda: self.unstage(volume_id, staging),
            lambda: self.delete_retrying(volume_id, "teardown")]
        for fn in steps:
            with contextlib.suppress(grpc.RpcError):
                fn()

    def snapshots(self, sizes: tuple[int, ...] = SNAPSHOT_SIZES, min_reps: int = 3,
                  max_reps: int = 20, budget_s: float = 20.0) -> dict[str, Any]:
        if CtlCap.CREATE_DELETE_SNAPSHOT not in self.ctl_caps:
            return {"skipped": "driver does not advertise CREATE_DELETE_SNAPSHOT"}
        out: dict[str, Any] = {}
        with self.phase("snapshot"):
            for size in sizes:
                out[human_size(size)] = self.snapshot_size(size, min_reps, max_reps, budget_s)
        return out

    def snapshot_size(self, size: int, min_reps: int, max_reps: int,
                      budget_s: float) -> dict[str, Any]:
        label = human_size(size)
        vol_size = max(GiB, size + size // 8 + 256 * MiB)
        name = self.name("snapsrc", label)
        staging, target = self.paths(name)
        vol = self.create_volume(name, vol_size)
        snaps: list[float] = []
        restores: list[float] = []
        verified: bool | None = None
        write_s = 0.0
        try:
            self.stage(vol, staging)
            self.publish(vol, staging, target)
            t0 = time.monotonic()
            digest = write_random_file(os.path.join(target, "data.bin"), size)
            write_s = time.monotonic() - t0
            t0 = time.monotonic()
            os.sync()
            sync_s = time.monotonic() - t0
            self.log(f"[{self.label}] snapshot {label}: wrote {label} in {write_s:.1f} s "
                     f"(+{sync_s:.1f} s sync)")
            start = time.monotonic()
            rep = 0
            while rep < max_reps and (rep < min_reps or time.monotonic() - start < budget_s):
                snap_name = self.name("snap", label, rep)
                t0 = time.perf_counter()
                snap = self.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                    name=snap_name, source_volume_id=vol.volume_id),
                    timeout=RPC_TIMEOUT).snapshot
                snaps.append(time.perf_counter() - t0)
                source = csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                        snapshot_id=snap.snapshot_id))
                t0 = time.perf_counter()
                restored = self.create_volume(self.name("restore", label, rep), vol_size,
                                              source)
                restores.append(time.perf_counter() - t0)
                if rep == 0 and size <= 256 * MiB:
                    verified = self.verify(restored, digest, self.name("verify", label))
                self.delete_retrying(restored.volume_id, f"snapshot_{label}")
                self.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
                    snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
                rep += 1
            self.log(f"[{self.label}] snapshot {label}: {rep} snapshots, p50 "
                     f"{summarize(snaps)['p50_ms']:.1f} ms; restore p50 "
                     f"{summarize(restores)['p50_ms']:.1f} ms")
        except grpc.RpcError as err:
            self.record_error(f"snapshot_{label}", err)
        finally:
            self.teardown(vol.volume_id, staging, target)
        return {"data_bytes": size, "volume_bytes": vol_size, "write_s": round(write_s, 2),
                "snapshot": summarize(snaps), "restore": summarize(restores),
                "restore_verified": verified}

    def verify(self, vol: csi_pb2.Volume, digest: str, name: str) -> bool:
        """Mount a restored volume and compare its data with what was written."""
        staging, target = self.paths(name)
        try:
            self.stage(vol, staging)
            self.publish(vol, staging, target)
            return sha256_file(os.path.join(target, "data.bin")) == digest
        except (grpc.RpcError, OSError) as err:
            self.record_error("verify", err)
            return False
        finally:
            steps: list[Callable[[], None]] = [
                lambda: self.unpublish(vol.volume_id, target),
                lambda: self.unstage(vol.volume_id, staging)]
            for fn in steps:
                with contextlib.suppress(grpc.RpcError):
                    fn()

    def list_volumes(self, volumes: int = 1000, page_size: int = 100, listings: int = 20,
                     concurrency: int = 8, size: int = 16 * MiB) -> dict[str, Any]:
        if CtlCap.LIST_VOLUMES not in self.ctl_caps:
            return {"skipped": "driver does not advertise LIST_VOLUMES"}
        ids: list[str] = [""] * volumes
        creates: list[float] = []

        def create(i: int) -> None:
            t0 = time.perf_counter()
            try:
                ids[i] = self.create_volume(self.name("lv", i), size).volume_id
            except grpc.RpcError as err:
                self.record_error("list_volumes_create", err)
                return
            creates.append(time.perf_counter() - t0)

        pages: list[float] = []
        full: list[float] = []
        seen = 0
        with self.phase("list_volumes_populate"):
            populate_wall = self.concurrently(volumes, concurrency, create)
        with self.phase("list_volumes"):
            for _ in range(listings):
                token = ""
                seen = 0
                t_full = time.perf_counter()
                while True:
                    t0 = time.perf_counter()
                    resp = self.controller.ListVolumes(csi_pb2.ListVolumesRequest(
                        max_entries=page_size, starting_token=token), timeout=RPC_TIMEOUT)
                    pages.append(time.perf_counter() - t0)
                    seen += len(resp.entries)
                    token = resp.next_token
                    if not token:
                        break
                full.append(time.perf_counter() - t_full)
        rss_full = rss_bytes(self.pid)
        with self.phase("list_volumes_cleanup"):
            delete_wall = self.concurrently(
                volumes, concurrency,
                lambda i: self.delete_volume(ids[i]) if ids[i] else None)
        return {
            "volumes": volumes, "page_size": page_size, "listings": listings,
            "entries_seen_last_listing": seen,
            "page": summarize(pages), "full_listing": summarize(full),
            "populate_creates_per_s": round(volumes / populate_wall, 2),
            "populate_create": summarize(creates),
            "cleanup_deletes_per_s": round(volumes / delete_wall, 2),
            "rss_with_volumes_mb": round(rss_full / MiB, 1),
        }


# ---- data ----------------------------------------------------------------------------

def write_random_file(path: str, size: int, block: int = 4 * MiB) -> str:
    """Write ``size`` incompressible bytes and fsync; returns their SHA-256.

    A 64 MiB random buffer is cycled: no compressor (gzip's window is 32 KiB) or file
    system here can exploit a 64 MiB period, and it avoids paying /dev/urandom per byte.
    """
    pattern = os.urandom(min(size, 64 * MiB))
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            off = written % len(pattern)
            chunk = pattern[off:off + min(block, size - written, len(pattern) - off)]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the whole workload ------------------------------------------------------------

@dataclass
class Workload:
    """How much of each measurement to do (defaults: the published run)."""

    probes: int = 2000
    cd_pairs: int = 300
    cd_rounds: int = 3
    concurrency: tuple[int, ...] = CONCURRENCY
    lc_volumes: dict[int, int] = field(default_factory=lambda: {1: 10, 8: 40})
    lc_rounds: int = 3
    snapshot_sizes: tuple[int, ...] = SNAPSHOT_SIZES
    snapshot_min_reps: int = 3
    snapshot_max_reps: int = 20
    snapshot_budget_s: float = 20.0
    list_volumes: int = 1000
    list_listings: int = 20
    idle_settle_s: float = 5.0

    @classmethod
    def quick(cls) -> Workload:
        """A smoke-sized workload for trying the harness (not for publishing)."""
        return cls(probes=200, cd_pairs=20, cd_rounds=1, lc_volumes={1: 2, 8: 8},
                   lc_rounds=1, snapshot_sizes=(1 * MiB, 64 * MiB), snapshot_min_reps=2,
                   snapshot_max_reps=2, list_volumes=120, list_listings=2,
                   idle_settle_s=1.0)


def run_workload(bench: Bench, wl: Workload) -> dict[str, Any]:
    result: dict[str, Any] = {
        "plugin": {"name": bench.plugin.name, "vendor_version": bench.plugin.vendor_version},
        "stage_unstage": bench.uses_stage,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    result["memory_idle_start"] = bench.idle_rss(wl.idle_settle_s)
    result["probe"] = bench.probe(wl.probes)
    result["create_delete"] = {
        f"c{c}": bench.create_delete(c, max(wl.cd_pairs, 4 * c), wl.cd_rounds)
        for c in wl.concurrency}
    result["lifecycle"] = {f"c{c}": bench.lifecycle(c, n, wl.lc_rounds)
                           for c, n in wl.lc_volumes.items()}
    result["list_volumes"] = bench.list_volumes(wl.list_volumes, listings=wl.list_listings)
    result["snapshot"] = bench.snapshots(wl.snapshot_sizes, wl.snapshot_min_reps,
                                         wl.snapshot_max_reps, wl.snapshot_budget_s)
    result["memory_idle_end"] = bench.idle_rss(wl.idle_settle_s)
    result["phases"] = {k: v.as_dict() for k, v in bench.phases.items()}
    result["memory_peak_under_load_mb"] = max(
        (p.rss_peak_mb for p in bench.phases.values()), default=0.0)
    result["errors"] = bench.errors
    result["retries"] = bench.retries
    if bench.diagnoses:
        result["retry_diagnoses"] = bench.diagnoses
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--endpoint", required=True, help="unix:///PATH of the CSI socket")
    p.add_argument("--workdir", required=True,
                   help="where staging and target paths are made (the driver must accept it)")
    p.add_argument("--pid", type=int, required=True, help="the driver's PID (RSS, CPU)")
    p.add_argument("--label", default="driver")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--quick", action="store_true", help="smoke-sized workload")
    args = p.parse_args(argv)
    bench = Bench(args.endpoint, args.workdir, args.pid, args.label)
    try:
        result = run_workload(bench, Workload.quick() if args.quick else Workload())
    finally:
        bench.close()
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    shutil.rmtree(os.path.join(args.workdir, "pods"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
