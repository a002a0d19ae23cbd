"""Start a CSI driver on its own socket and state directory; stop it by PID; clean up.

Each driver gets ``<root>/<label>/`` with ``csi.sock``, ``state/`` and ``driver.log``.
After the driver is stopped, every mount under that directory is unmounted (deepest
first) and every loop device whose backing file lives there is detached, whatever the
driver left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or under ``prefix``, deepest (last mounted) first."""
    prefix = prefix.rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return list(reversed(found))


def loops_backed_under(prefix: str) -> list[str]:
    """/dev/loopN devices whose backing file is under ``prefix``."""
    prefix = prefix.rstrip("/") + "/"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir("/sys/block")):
            backing = f"/sys/block/{name}/loop/backing_file"
            try:
                with open(backing) as f:
                    path = f.read().strip().removesuffix(" (deleted)")
            except OSError:
                continue
            if path.startswith(prefix):
                found.append(f"/dev/{name}")
    return found


def cleanup_tree(root: str, log: Callable[[str], None] = print) -> dict[str, int]:
    """Unmount everything under ``root``, detach its loop devices; returns the counts."""
    unmounted = detached = 0
    # Volume mounts sit on loop devices whose images live on a pool mount, which is
    # itself a loop device: unmount what can be, detach, and repeat.
    for _ in range(6):
        points, loops = mounts_under(root), loops_backed_under(root)
        if not points and not loops:
            break
        for point in points:
            res = subprocess.run(["umount", point], capture_output=True, check=False)
            unmounted += res.returncode == 0
        for dev in loops:
            res = subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
            detached += res.returncode == 0
        time.sleep(0.2)  # loop detach (autoclear) completes asynchronously
    for point in mounts_under(root):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left_mounts, left_loops = mounts_under(root), loops_backed_under(root)
    if left_mounts or left_loops:
        log(f"cleanup of {root} left mounts {left_mounts} and loop devices {left_loops}")
    return {"unmounted": unmounted, "loops_detached": detached,
            "left_mounts": len(left_mounts), "left_loops": len(left_loops)}


@dataclass
class DriverSpec:
    """How to start one driver. ``argv`` may use {socket}, {state}, {workdir}."""

    label: str
    argv: Sequence[str]
    #: directory under which staging/target paths are made (must be acceptable to it)
    workdir_rel: str = "kubelet"
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""


class RunningDriver:
    def __init__(self, spec: DriverSpec, root: str, log: Callable[[str], None] = print) -> None:
        self.spec = spec
        self.base = os.path.join(os.path.abspath(root), spec.label)
        self.socket = os.path.join(self.base, "csi.sock")
        self.state = os.path.join(self.base, "state")
        self.workdir = os.path.join(self.state, spec.workdir_rel)
        self.logfile = os.path.join(self.base, "driver.log")
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> None:
        if os.path.exists(self.base):
            cleanup_tree(self.base, self.log)
            shutil.rmtree(self.base)
        os.makedirs(self.workdir)
        argv = [a.format(socket=self.socket, state=self.state, workdir=self.workdir)
                for a in self.spec.argv]
        self.log(f"[{self.spec.label}] starting: {' '.join(argv)}")
        t0 = time.monotonic()
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.spec.env},
                                         start_new_session=True)
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.label} exited {self.proc.returncode}: "
                                   f"{self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{self.spec.label} did not create {self.socket} "
                                   f"within {timeout:.0f} s: {self.tail()}")
            time.sleep(0.02)
        with open(os.path.join(self.base, "driver.pid"), "w") as f:
            f.write(f"{self.proc.pid}\n")
        self.startup_s = time.monotonic() - t0
        self.log(f"[{self.spec.label}] PID {self.proc.pid}, socket after "
                 f"{self.startup_s:.2f} s")

    def tail(self, chars: int = 2000) -> str:
        try:
            with open(self.logfile, "rb") as f:
                return f.read()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM by PID, SIGKILL after ``grace``; returns the exit code."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.log(f"[{self.spec.label}] no exit after SIGTERM; SIGKILL {self.proc.pid}")
                self.proc.kill()
                code = self.proc.wait()
        self.log(f"[{self.spec.label}] PID {self.proc.pid} exited {code}")
        return code

    def cleanup(self, keep_log_to: str | None = None) -> dict[str, int]:
        counts = cleanup_tree(self.base, self.log)
        if keep_log_to and os.path.exists(self.logfile):
            shutil.copy(self.logfile, keep_log_to)
        shutil.rmtree(self.base, ignore_errors=True)
        return counts


def kill_leftovers(root: str, log: Callable[[str], None] = print) -> None:
    """After an interrupted run: SIGKILL the drivers recorded in ``<root>/*/driver.pid``
    (by PID, only if that PID still runs the recorded executable), then clean up."""
    if not os.path.isdir(root):
        return
    for entry in sorted(os.listdir(root)):
        pidfile = os.path.join(root, entry, "driver.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if os.path.join(root, entry) in cmdline:
            log(f"killing leftover driver {entry} (PID {pid})")
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            time.sleep(0.2)
    cleanup_tree(root, log)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--cleanup":
        sys.exit("usage: python -m bench.drivers --cleanup WORKROOT")
    kill_leftovers(os.path.abspath(sys.argv[2]))
