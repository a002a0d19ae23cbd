"""Run the same workload against Flotilla and csi-driver-host-path; write the results.

``python -m bench.main --results-dir bench/results [--hostpath-binary PATH | --hostpath-
unavailable REASON]`` starts each driver on its own socket and state directory, runs
:func:`bench.csibench.run_workload` against it, stops it by PID and cleans up its mounts
and loop devices, then writes ``<date>.json``, ``<date>.md`` and ``<date>.png``.
``bench/run.sh`` (``make bench``) builds the peer and calls this.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from types import FrameType
from typing import Any

from bench import report
from bench.csibench import Bench, Workload, run_workload
from bench.drivers import DriverSpec, RunningDriver
from bench.reference import tar_snapshot_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def command_output(*argv: str) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip()


def host_info() -> dict[str, Any]:
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    cpu_model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "go": command_output("go", "version"),
        "tar": command_output("tar", "--version").splitlines()[0:1],
        "commit": command_output("git", "-C", REPO, "rev-parse", "--short", "HEAD"),
        "tree_dirty": bool(command_output("git", "-C", REPO, "status", "--porcelain",
                                          "--", "csi", "bench", "pyproject.toml")),
    }


def loop_holders(message: str) -> dict[str, Any]:
    """Flotilla diagnosis for a refused DeleteVolume: who still holds the loop device?

    Reads the device's autoclear flag (set when ``losetup -d`` found it still open)
    and lists processes with it open or mounted, at the moment of the refusal.
    """
    match = re.search(r"/dev/loop\d+", message)
    if not match:
        return {}
    dev = match.group(0)
    name = os.path.basename(dev)
    found: dict[str, Any] = {"device": dev}
    try:
        with open(f"/sys/block/{name}/loop/autoclear") as f:
            found["autoclear"] = f.read().strip()
    except OSError:
        found["autoclear"] = "device released"
    holders = []
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) == dev:
                pid = fd.split("/")[2]
                with open(f"/proc/{pid}/comm") as f:
                    holders.append(f"{pid}:{f.read().strip()}")
    found["open_by"] = sorted(set(holders))
    try:
        with open(f"/sys/block/{name}/holders") as f:
            found["sys_holders"] = f.read().split()
    except OSError:
        pass
    found["mounted_in_pids"] = []
    for mi in glob.glob("/proc/[0-9]*/mountinfo"):
        with contextlib.suppress(OSError), open(mi) as f:
            if any(f" {dev} " in line for line in f):
                found["mounted_in_pids"].append(mi.split("/")[2])
    found["mounted_in_pids"] = found["mounted_in_pids"][:10]
    return found


def flotilla_spec() -> DriverSpec:
    exe = os.path.join(REPO, ".venv", "bin", "flotilla")
    from csi import __version__
    return DriverSpec(
        label="flotilla",
        argv=[exe, "--mode", "all", "--endpoint", "unix://{socket}", "--node-id",
              "bench-node", "--state-dir", "{state}"],
        version=__version__,
    )


def hostpath_spec(binary: str, version: str) -> DriverSpec:
    return DriverSpec(
        label="hostpath",
        argv=[binary, "--endpoint", "unix://{socket}", "--nodeid", "bench-node",
              "--drivername", "hostpath.csi.k8s.io", "--statedir", "{state}"],
        version=version,
    )


def run_driver(spec: DriverSpec, workroot: str, wl: Workload,
               logs_dir: str) -> dict[str, Any]:
    drv = RunningDriver(spec, workroot, log)
    out: dict[str, Any] = {"status": "failed", "version": spec.version,
                           "argv": list(spec.argv)}
    try:
        drv.start()
        out["startup_s"] = round(drv.startup_s, 3)
        out["pid"] = drv.pid
        bench = Bench(drv.endpoint, drv.workdir, drv.pid, spec.label, log,
                      diagnose=loop_holders if spec.label == "flotilla" else None)
        try:
            out["results"] = run_workload(bench, wl)
        finally:
            bench.close()
        out["status"] = "ok"
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()[-3000:]
        out["driver_log_tail"] = drv.tail()
        log(f"[{spec.label}] FAILED: {out['error']}")
    finally:
        out["exit_code"] = drv.stop()
        out["cleanup"] = drv.cleanup(os.path.join(logs_dir, f"{spec.label}.log"))
        log(f"[{spec.label}] cleanup: {out['cleanup']}")
    return out


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Flotilla vs csi-driver-host-path benchmarks")
    p.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--workroot", default="/var/tmp/flotilla-bench")
    p.add_argument("--hostpath-binary", default="")
    p.add_argument("--hostpath-version", default="")
    p.add_argument("--hostpath-unavailable", default="",
                   help="why the peer could not be built (recorded in the results)")
    p.add_argument("--date", default=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    p.add_argument("--started-epoch", type=float, default=0.0,
                   help="when make bench started (to report its whole wall time)")
    p.add_argument("--quick", action="store_true", help="smoke-sized workload, not published")
    p.add_argument("--only", choices=("flotilla", "hostpath", "reference"), action="append",
                   help="run only these parts (default: all that apply)")
    p.add_argument("--benchmarks-md", default=os.path.join(REPO, "BENCHMARKS.md"),
                   help="update the generated section of this file ('' to skip)")
    args = p.parse_args(argv)
    # SIGTERM (a stopped make) unwinds like Ctrl-C, so drivers are stopped and cleaned up
    signal.signal(signal.SIGTERM, _interrupt)
    if os.geteuid() != 0:
        print("bench needs root (loop devices, mounts)", file=sys.stderr)
        return 1
    t_start = time.monotonic()
    since = time.time() - args.started_epoch if args.started_epoch else 0.0
    wl = Workload.quick() if args.quick else Workload()
    os.makedirs(args.results_dir, exist_ok=True)
    logs_dir = os.path.join(REPO, "bench", ".build", "logs")
    os.makedirs(logs_dir, exist_ok=True)
    only = set(args.only or ("flotilla", "hostpath", "reference"))
    result: dict[str, Any] = {
        "schema": 1,
        "date": args.date,
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "quick": args.quick,
        "host": host_info(),
        "workload": report.workload_dict(wl),
        "drivers": {},
    }
    log(f"load average at start: {result['loadavg_start']}")
    if "flotilla" in only:
        result["drivers"]["flotilla"] = run_driver(flotilla_spec(), args.workroot, wl,
                                                   logs_dir)
    peer_ran = False
    if "hostpath" in only:
        if args.hostpath_binary:
            result["drivers"]["hostpath"] = run_driver(
                hostpath_spec(args.hostpath_binary, args.hostpath_version), args.workroot,
                wl, logs_dir)
            peer_ran = result["drivers"]["hostpath"]["status"] == "ok"
        else:
            result["drivers"]["hostpath"] = {
                "status": "unavailable", "version": args.hostpath_version,
                "error": args.hostpath_unavailable or "no --hostpath-binary given"}
    if "reference" in only and not peer_ran:
        log("[reference] the peer did not run: timing host-path's snapshot mechanism "
            "(tar) directly instead")
        result["reference_tar"] = tar_snapshot_reference(
            os.path.join(args.workroot, "reference"), wl.snapshot_sizes,
            wl.snapshot_min_reps, wl.snapshot_max_reps, wl.snapshot_budget_s, log)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    if since:  # make bench, including the set-up and the peer's build
        result["make_bench_wall_s"] = round(result["wall_s"] + since, 1)
    result["targets"] = report.targets(result)
    stem = os.path.join(args.results_dir, args.date + ("-quick" if args.quick else ""))
    with open(stem + ".json.tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(stem + ".json.tmp", stem + ".json")
    table = report.markdown(result, os.path.basename(stem) + ".png")
    with open(stem + ".md", "w") as f:
        f.write(table)
    report.plot(result, stem + ".png")
    if args.benchmarks_md and not args.quick:
        report.update_benchmarks_md(args.benchmarks_md, result, os.path.relpath(
            stem + ".png", os.path.dirname(os.path.abspath(args.benchmarks_md))))
    log(f"wrote {stem}.json, .md, .png in {result['wall_s']:.0f} s")
    for t in result["targets"]:
        log(f"target {t['target']}: {t['measured']} -> {t['verdict']}")
    return 0 if all(d.get("status") != "failed" for d in result["drivers"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
