"""The nfs pool against kernel nfsd inside a guest (the host kernel has no NFS): the pool
contract suite, the nfs node tests (ReadWriteMany, stale handles, a dead server), XFS
project quotas, csi-sanity (mount), and a measured CLONE-versus-copy snapshot of 1 GiB.

One guest boots, formats its scratch disk as XFS (reflink=1, prjquota), exports it with
knfsd on loopback (NFSv4.2), and runs pytest; the host reads back the JUnit verdict."""

from __future__ import annotations

import json
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.helpers import REPO, GiB
from tests.sanity.test_csi_sanity import csi_sanity_binary
from tests.vm.guest import run_in_guest

pytestmark = [pytest.mark.root, pytest.mark.vm]

NFS_MODULES = ("nfsd", "nfs", "nfsv4", "xfs", "loop", "ext4")
GUEST_TIMEOUT = 2400

NFSD_SETUP = r"""
mkfs.xfs -q -f -m reflink=1 /dev/vda
mkdir -p /srv/export /run/rpcbind /var/lib/nfs/rpc_pipefs /var/lib/nfs/v4recovery
mount -o prjquota /dev/vda /srv/export
mount -t nfsd nfsd /proc/fs/nfsd
rpcbind -w
exportfs -o rw,no_root_squash,no_subtree_check,insecure,fsid=0 127.0.0.1:/srv/export
rpc.mountd
rpc.nfsd 8
echo Y > /proc/fs/nfsd/v4_end_grace 2>/dev/null || true
export FLOTILLA_NFS_SERVER=127.0.0.1 FLOTILLA_NFS_SHARE=/ FLOTILLA_NFS_EXPORT_DIR=/srv/export
"""

GUEST_TESTS = [
    "tests/integration/test_pool_contract.py",
    "tests/integration/test_nfs.py",
    "tests/integration/test_nfs_node.py",
    "tests/sanity/test_csi_sanity.py",
]
#: tests that must have run (not skipped) in the guest
MUST_RUN = ("test_xfs_project_quota_enforces_the_size", "test_dead_server_never_blocks",
            "test_stale_handle_is_detected_and_remounted", "test_csi_sanity[nfs-mount]",
            "test_kill_at_a_random_moment_leaves_complete_objects[nfs-0]")


@pytest.mark.timeout(GUEST_TIMEOUT + 60)
def test_nfs_in_guest(workdir: Path) -> None:
    job = workdir / "job"
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "-s",
            "--junitxml=/job/junit.xml", *GUEST_TESTS]
    script = (NFSD_SETUP + f"cd {shlex.quote(str(REPO))}\n"
              f"{shlex.join(argv)} || echo $? > /job/pytest.rc\n"
              f"{sys.executable} tests/vm/nfs_snapshot_timing.py /job/timing.json\n"
              "test ! -e /job/pytest.rc\n")
    result = run_in_guest(script, modules=NFS_MODULES, disks=[24 * GiB],
                          timeout=GUEST_TIMEOUT, jobdir=job, env={
                              "FLOTILLA_POOL_TYPES": "nfs", "FLOTILLA_SANITY_POOLS": "nfs",
                              "FLOTILLA_NFSD_CONTROL": "1", "CSI_SANITY": csi_sanity_binary(),
                              "PYTHONDONTWRITEBYTECODE": "1"})
    print(result.output[-4000:])
    print(f"[guest] nfs tier: rc={result.returncode} in {result.seconds:.0f}s")
    junit = job / "junit.xml"
    assert junit.exists(), f"the guest wrote no JUnit report\n{result.describe()}"
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    cases = {c.get("name", ""): c for c in suite.iter("testcase")}
    failed = [n for n, c in cases.items() if c.find("failure") is not None
              or c.find("error") is not None]
    skipped = {n for n, c in cases.items() if c.find("skipped") is not None}
    print(f"[guest] {len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped")
    assert not failed, f"failed in the guest: {failed}\n{result.describe()}"
    for name in MUST_RUN:
        ran = [n for n in cases if n.startswith(name) and n not in skipped]
        assert ran, f"{name} did not run in the guest\n{result.describe()}"
    timing = json.loads((job / "timing.json").read_text())
    print(f"[guest] 1 GiB nfs snapshot: clone {timing['auto']['seconds']} s, copy "
          f"{timing['copy']['seconds']} s ({timing['copy_over_clone']}x)")
    assert timing["auto"]["cloned_files"] == 1 and timing["auto"]["copied_files"] == 0
    assert timing["copy"]["copied_files"] == 1
    assert result.ok, result.describe()
