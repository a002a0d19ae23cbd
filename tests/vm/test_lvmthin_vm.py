"""The lvmthin pool on a real device-mapper: the pool contract suite, csi-sanity (mount
and block) and online ext4 growth, each run by pytest inside a fresh guest.

The host kernel may have no device-mapper (and a container's root no CAP_SYS_RESOURCE);
the guest has both. Each test boots its own guest with a blank scratch disk
(``/dev/vda``) that the harness turns into a VG with a thin pool, and returns the guest's
pytest verdict: the exit status file, and the JUnit report for the counts.
"""

from __future__ import annotations

import re
import shlex
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.helpers import REPO, GiB
from tests.sanity.test_csi_sanity import csi_sanity_binary
from tests.vm.guest import LVM_MODULES, GuestJob, GuestResult

pytestmark = [pytest.mark.root, pytest.mark.vm]

#: each guest run is bounded by this (qemu is killed)
GUEST_TIMEOUT = 900
#: a test may also wait for the guests scheduled before its own
WAIT_TIMEOUT = 4 * GUEST_TIMEOUT


@dataclass
class Counts:
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def guest_pytest(args: list[str], env: dict[str, str], expected_seconds: float,
                 disk: int = 16 * GiB) -> GuestJob:
    """A guest job running ``pytest ARGS`` from the repository, on a blank scratch disk
    ``/dev/vda`` that the lvmthin harness turns into a VG with a thin pool."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", "-q", "-rfEs", "--junitxml=/job/junit.xml", *args]
    script = f"cd {shlex.quote(str(REPO))}\n{shlex.join(argv)}\n"
    return GuestJob(script, modules=LVM_MODULES, disks=(disk,), timeout=GUEST_TIMEOUT,
                    env=tuple({"FLOTILLA_LVM_DEVICE": "/dev/vda",
                               "PYTHONDONTWRITEBYTECODE": "1", **env}.items()),
                    expected_seconds=expected_seconds)


def _sanity(access_type: str) -> GuestJob:
    return guest_pytest(["-s", "tests/sanity/test_csi_sanity.py", "-k", access_type],
                        {"FLOTILLA_SANITY_POOLS": "lvmthin", "CSI_SANITY": csi_sanity_binary()},
                        expected_seconds=200)


GUEST_JOBS: dict[str, GuestJob | Callable[[], GuestJob]] = {
    "contract": guest_pytest(["tests/integration/test_pool_contract.py"],
                             {"FLOTILLA_POOL_TYPES": "lvmthin"}, expected_seconds=150),
    "sanity-mount": lambda: _sanity("mount"),
    "sanity-block": lambda: _sanity("block"),
    # online resize2fs needs CAP_SYS_RESOURCE, which root in the guest has
    "ext4-online": guest_pytest(
        ["tests/integration/test_node.py::test_ext4_online_growth"], {}, expected_seconds=40),
}


def counts_of(result: GuestResult, what: str) -> Counts:
    """Print the guest's output and return its pytest counts (from the JUnit report)."""
    print(result.output[-3000:])
    print(f"[guest] {what}: rc={result.returncode} in {result.seconds:.0f}s")
    junit = result.jobdir / "junit.xml"
    assert junit.exists(), f"the guest wrote no JUnit report\n{result.describe()}"
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = Counts(*(int(suite.get(k, "0")) for k in ("tests", "failures", "errors",
                                                         "skipped")))
    print(f"[guest] {what}: {counts.passed} passed, {counts.failures} failed, "
          f"{counts.errors} errors, {counts.skipped} skipped")
    return counts


@pytest.mark.timeout(WAIT_TIMEOUT)
@pytest.mark.guest_job("contract")
def test_pool_contract_lvmthin(guest_result: GuestResult) -> None:
    counts = counts_of(guest_result, "pool contract (lvmthin)")
    assert guest_result.ok, guest_result.describe()
    assert counts.failures == counts.errors == counts.skipped == 0, guest_result.describe()
    assert counts.passed >= 15, f"the contract suite ran too few tests: {counts}"


@pytest.mark.timeout(WAIT_TIMEOUT)
@pytest.mark.parametrize("access_type", [
    pytest.param("mount", marks=pytest.mark.guest_job("sanity-mount")),
    pytest.param("block", marks=pytest.mark.guest_job("sanity-block")),
])
def test_csi_sanity_lvmthin(guest_result: GuestResult, access_type: str) -> None:
    counts = counts_of(guest_result, f"csi-sanity {access_type} (lvmthin)")
    assert guest_result.ok, guest_result.describe()
    assert counts.passed == 1 and counts.failures == counts.errors == 0, \
        guest_result.describe()
    summary = re.search(rf"csi-sanity lvmthin {access_type}: (\{{.*\}})", guest_result.output)
    assert summary, guest_result.describe()
    print(f"[guest] csi-sanity lvmthin {access_type}: {summary.group(1)}")


@pytest.mark.timeout(WAIT_TIMEOUT)
@pytest.mark.guest_job("ext4-online")
def test_node_ext4_online_growth(guest_result: GuestResult) -> None:
    counts = counts_of(guest_result, "online ext4 growth")
    assert guest_result.ok, guest_result.describe()
    assert counts.passed == 1 and counts.skipped == 0, \
        f"online ext4 growth did not run in the guest: {counts}\n{guest_result.describe()}"
