"""The guest harness itself: a guest's failure, crash or hang never reads as success."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO
from tests.vm.guest import GuestJob, GuestResult

pytestmark = [pytest.mark.root, pytest.mark.vm]

GREETING = "it's \"quoted\" $HOME"

GUEST_JOBS = {
    "status": GuestJob(
        'echo "kernel $(uname -r)"; printf %s "$GREETING" > /job/greeting; '
        f'test "$FLOTILLA_IN_GUEST" = 1; test -f {REPO}/pyproject.toml; exit 7',
        timeout=300, env=(("GREETING", GREETING),), expected_seconds=10),
    "panic": GuestJob("echo c > /proc/sysrq-trigger; sleep 60", timeout=300,
                      expected_seconds=10),
    "hang": GuestJob("sleep 1000", timeout=25, guest_timeout=900, expected_seconds=25),
}


@pytest.mark.guest_job("status")
def test_exit_status_files_and_environment_come_back(guest_result: GuestResult) -> None:
    assert guest_result.returncode == 7, guest_result.describe()
    assert not guest_result.ok
    assert (guest_result.jobdir / "greeting").read_text() == GREETING
    assert "kernel " in guest_result.output


@pytest.mark.guest_job("panic")
def test_kernel_panic_is_not_success(guest_result: GuestResult) -> None:
    assert guest_result.returncode is None and not guest_result.ok, guest_result.describe()
    assert "Kernel panic" in guest_result.console or "sysrq" in guest_result.console.lower()


@pytest.mark.guest_job("hang")
def test_hang_is_killed_at_the_hard_timeout(guest_result: GuestResult) -> None:
    assert guest_result.timed_out and guest_result.returncode is None
    assert not guest_result.ok
    assert guest_result.seconds < 60
    # qemu was killed by PID: nothing of it is left
    jobdir = str(guest_result.jobdir).encode()
    qemu = [p for p in os.listdir("/proc") if p.isdigit()
            and _cmdline(p).startswith(b"qemu-system") and jobdir in _cmdline(p)]
    assert qemu == []


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
