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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, GiB
from tests.sanity.test_csi_sanity import csi_sanity_binary
from tests.vm.guest import LVM_MODULES, GuestResult, run_in_guest

pytestmark = [pytest.mark.root, pytest.mark.vm]

#: each guest run is bounded by this; pytest-timeout gets a minute more
GUEST_TIMEOUT = 1500


@dataclass
class Counts:
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def guest_pytest(workdir: Path, args: list[str], env: dict[str, str],
                 disk: int = 16 * GiB) -> tuple[GuestResult, Counts]:
    """Run ``pytest ARGS`` from the repository inside a guest; return what came back."""
    job = workdir / "job"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-p", "no:hypothesispytest", "-q", "-rfEs", "--junitxml=/job/junit.xml", *args]
    script = f"cd {shlex.quote(str(REPO))}\n{shlex.join(argv)}\n"
    result = run_in_guest(script, modules=LVM_MODULES, disks=[disk], timeout=GUEST_TIMEOUT,
                          jobdir=job, env={"FLOTILLA_LVM_DEVICE": "/dev/vda",
                                           "PYTHONDONTWRITEBYTECODE": "1", **env})
    print(result.output[-3000:])
    print(f"[guest] {shlex.join(args)}: rc={result.returncode} in {result.seconds:.0f}s")
    junit = job / "junit.xml"
    assert junit.exists(), f"the guest wrote no JUnit report\n{result.describe()}"
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    counts = Counts(*(int(suite.get(k, "0")) for k in ("tests", "failures", "errors",
                                                         "skipped")))
    print(f"[guest] {counts.passed} passed, {counts.failures} failed, {counts.errors} "
          f"errors, {counts.skipped} skipped")
    return result, counts


@pytest.mark.timeout(GUEST_TIMEOUT + 60)
def test_pool_contract_lvmthin(workdir: Path) -> None:
    result, counts = guest_pytest(workdir, ["tests/integration/test_pool_contract.py"],
                                  {"FLOTILLA_POOL_TYPES": "lvmthin"})
    assert result.ok, result.describe()
    assert counts.failures == counts.errors == counts.skipped == 0, result.describe()
    assert counts.passed >= 15, f"the contract suite ran too few tests: {counts}"


@pytest.mark.timeout(GUEST_TIMEOUT + 60)
@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_lvmthin(workdir: Path, access_type: str) -> None:
    result, counts = guest_pytest(
        workdir, ["-s", "tests/sanity/test_csi_sanity.py", "-k", access_type],
        {"FLOTILLA_SANITY_POOLS": "lvmthin", "CSI_SANITY": csi_sanity_binary()})
    assert result.ok, result.describe()
    assert counts.passed == 1 and counts.failures == counts.errors == 0, result.describe()
    summary = re.search(rf"csi-sanity lvmthin {access_type}: (\{{.*\}})", result.output)
    assert summary, result.describe()
    print(f"[guest] csi-sanity lvmthin {access_type}: {summary.group(1)}")


@pytest.mark.timeout(GUEST_TIMEOUT + 60)
def test_node_ext4_online_growth(workdir: Path) -> None:
    """Online resize2fs needs CAP_SYS_RESOURCE, which root in the guest has."""
    node_tests = REPO / "tests" / "integration" / "test_node.py"
    if "def test_ext4_online_growth" not in node_tests.read_text():
        pytest.fail("tests/integration/test_node.py lost test_ext4_online_growth; update "
                    "this test")
    result, counts = guest_pytest(workdir, [f"{node_tests}::test_ext4_online_growth"], {})
    assert result.ok, result.describe()
    assert counts.passed == 1 and counts.skipped == 0, \
        f"online ext4 growth did not run in the guest: {counts}\n{result.describe()}"
