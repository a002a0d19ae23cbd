"""The guest harness itself: a guest's failure, crash or hang never reads as success."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.vm.guest import run_in_guest

pytestmark = [pytest.mark.root, pytest.mark.vm]


def test_exit_status_files_and_environment_come_back(workdir: Path) -> None:
    greeting = "it's \"quoted\" $HOME"
    result = run_in_guest(
        'echo "kernel $(uname -r)"; printf %s "$GREETING" > /job/greeting; '
        'test "$FLOTILLA_IN_GUEST" = 1; test -d /work; exit 7',
        jobdir=workdir / "job", timeout=300, env={"GREETING": greeting})
    assert result.returncode == 7, result.describe()
    assert not result.ok
    assert (workdir / "job" / "greeting").read_text() == greeting
    assert "kernel " in result.output


def test_kernel_panic_is_not_success(workdir: Path) -> None:
    result = run_in_guest("echo c > /proc/sysrq-trigger; sleep 60", jobdir=workdir / "job",
                          timeout=300)
    assert result.returncode is None and not result.ok, result.describe()
    assert "Kernel panic" in result.console or "sysrq" in result.console.lower()


def test_hang_is_killed_at_the_hard_timeout(workdir: Path) -> None:
    started = time.monotonic()
    result = run_in_guest("sleep 1000", jobdir=workdir / "job", timeout=40,
                          guest_timeout=900)
    assert result.timed_out and result.returncode is None and not result.ok
    assert time.monotonic() - started < 90
    # qemu was killed by PID: nothing of it is left
    qemu = [p for p in os.listdir("/proc") if p.isdigit()
            and _cmdline(p).startswith(b"qemu-system") and str(workdir).encode() in _cmdline(p)]
    assert qemu == []


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
