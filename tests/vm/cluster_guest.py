"""The real-node tier (tests/cluster) against the chart's ``lvmthin`` and ``nfs`` pools, on
a whole single-node cluster inside a guest: the host kernel has neither device-mapper nor
NFS, the guest's Debian kernel has both.

One guest boots with three scratch disks: ``/dev/vda`` becomes the VG ``flotilla`` with the
thin pool ``thinpool`` (the lvmthin pool), ``/dev/vdb`` an XFS (reflink) export served by
the guest's knfsd (the nfs pool), ``/dev/vdc`` the cluster's state directory (containerd's
overlayfs snapshotter cannot live on the guest's overlay root). The guest has no NIC: a
dummy interface carries the node's address, the default route and the NFS server's
address, and the whole module tree of the guest kernel is made loadable on demand
(:func:`tests.vm.guest.module_tree`) so that kube-proxy's nftables, the bridge CNI's veth
and bridge, conntrack and NAT load as the kernel asks for them. Then, exactly as on the
host, ``python -m tests.cluster.rig up`` brings the cluster up and installs the chart (with
FLOTILLA_CLUSTER_POOLS naming the two pools), ``pytest tests/cluster`` runs the user
flows, and ``rig down`` takes it all away and checks that nothing is left. The host reads
back the JUnit report, the phases' durations and, on failure, the cluster's logs.

The cluster's binaries and images come on a read-only virtio disk (an ext4 image made
with ``mkfs.ext4 -d``, cached per content: :func:`assets_disk`), mounted over their 9p
paths: over 9p (~1 MB/s) containerd took 20 minutes to import the images.

NOT YET PART OF THE TEST COMMAND (not collected: no ``test_`` prefix). Its last run
(2026-12-08, a quiet host): the cluster up in 459 s with the chart Ready on both pools,
``test_the_chart_registers_serves_and_reports`` passed, and the first user flow on
lvmthin got its PVC bound and its pod Ready, then failed at its first check, ``df``:
busybox in the pod says "df: /data: can't find mount point" (the same image's df works
on the host's filepool). Cause, from the pod's mountinfo: the guest's init ``chroot``s
into /newroot (the overlay) on top of the initramfs rootfs, so every container's mount
table names its mounts ``/newroot/data``, ``/newroot/etc/hosts``, ... and not ``/data``.
Next step: enter the overlay as a real root (``mount --move /newroot /`` then chroot, as
switch_root does) so that containers see themselves at ``/``.
Run it by hand::

    .venv/bin/python -m tests.vm.cluster_guest [PYTEST-ARGS]   # e.g. -x --tb=short
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.cluster.rig import images
from tests.e2e.cluster import tools_dir
from tests.helpers import REPO, GiB
from tests.vm.guest import (
    CACHE,
    LVM_MODULES,
    GuestJob,
    GuestResult,
    kernel,
    module_tree,
    run_in_guest,
)

#: the whole guest run (qemu is killed after it)
GUEST_TIMEOUT = 3600
NODE_IP = "10.0.2.15"
#: what the initramfs loads up front: device-mapper (its /dev/mapper/control must exist
#: before lvm runs), knfsd and the NFS client, and br_netfilter (bridged pod traffic goes
#: through kube-proxy's rules, as on the host); the rest loads on demand
MODULES = (*LVM_MODULES, "nfsd", "nfs", "nfsv4", "br_netfilter")

POOLS = {"pools": [
    {"name": "thin", "type": "lvmthin", "volume_group": "flotilla", "thin_pool": "thinpool"},
    {"name": "shared", "type": "nfs", "server": NODE_IP, "share": "/"},
]}

#: parametrizations that must have run (not been skipped) for each pool
MUST_RUN = {
    "thin": ("test_statefulset_data_outlives_its_pod", "test_raw_block_volume",
             "test_snapshot_restore_and_clone_of_a_volume_in_use",
             "test_online_expansion_seen_by_the_running_pod"),
    "shared": ("test_statefulset_data_outlives_its_pod",
               "test_snapshot_restore_and_clone_of_a_volume_in_use",
               "test_two_deployments_share_a_readwritemany_claim"),
}

#: the host's own cluster (if one runs) has its state in these paths; the guest's rig
#: must start from nothing, so the guest does not see them (the host's files stay as they
#: are: the guest's root is a read-only view with an overlay)
HIDE = ("/var/lib/kubelet", "/var/lib/flotilla", "/var/lib/flotilla-cluster",
        "/var/log/pods", "/var/log/containers", "/var/lib/cni")

SETUP = r"""
t_start=$(date +%s)
phase() {
    echo "$1 $(( $(date +%s) - t_start ))" >> /job/phases
    echo "== $1 at +$(( $(date +%s) - t_start ))s"
}
phase boot-done
# warnings with their stack traces on the console (console.log): a first run saw kine's
# threads in a soft lockup on both vCPUs, with no trace at the default level
dmesg -n 5
# progress the host can follow while the guest runs (TCG is slow: where is the time going)
# (set +e: the job runs under set -e, and a copy before the logs exist must not end it)
( set +e; while sleep 30; do
    mkdir -p /job/live
    ps -eo pid,etime,time,rss,args > /job/live/ps.txt 2>/dev/null
    cp /var/lib/flotilla-cluster/state/logs/*.log /job/live/ 2>/dev/null
    KUBECONFIG=/var/lib/flotilla-cluster/state/admin.kubeconfig \
        "$ASSET_BIN/kubectl" get pods,pvc,pv,volumesnapshot -A -o wide \
        > /job/live/objects.txt 2>&1
    cp -r /var/log/pods /job/live/ 2>/dev/null
  done ) >/dev/null 2>&1 &
# --- kernel modules on demand: the kernel runs /sbin/modprobe (busybox, in the initramfs:
# PID 1's root) for request_module; the chroot gets the same tree and a modprobe
V=$(uname -r)
mkdir -p /proc/1/root/lib/modules/$V /lib/modules/$V
# (--no-canonicalize: mount would resolve /proc/1/root to the chroot's own /)
mount --no-canonicalize --bind "$MODULE_TREE" /proc/1/root/lib/modules/$V
mount --bind "$MODULE_TREE" /lib/modules/$V
command -v modprobe >/dev/null || ln -s /bin/busybox /usr/local/sbin/modprobe
# --- cgroup v1 hierarchies as on the host (the kubelet runs cgroupfs on v1)
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids hugetlb; do
    mkdir -p /sys/fs/cgroup/$c; mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
# --- the node's address: no NIC, so a dummy interface with a default route
ip link add node0 type dummy
ip addr add "$NODE_IP/24" dev node0
ip link set node0 up
ip route add default via 10.0.2.2 dev node0 onlink
# --- the cluster's binaries and images from a read-only disk, over their 9p paths (9p
# reads ~1 MB/s here: importing the images from it took 20 minutes)
mkdir -p /mnt/assets
mount -o ro /dev/vdd /mnt/assets
mount --bind /mnt/assets/images "$ASSET_IMAGES"
mount --bind /mnt/assets/bin "$ASSET_BIN"
# --- the cluster's state on a real filesystem (overlayfs snapshots, kine's SQLite)
mkfs.ext4 -q -F /dev/vdc
mkdir -p /var/lib/flotilla-cluster
mount /dev/vdc /var/lib/flotilla-cluster
# --- the lvmthin pool's VG and thin pool (lvm without udev, as the driver runs it)
LVMCONF='activation{udev_sync=0 udev_rules=0 monitoring=0}
devices{obtain_device_list_from_udev=0 use_devicesfile=0}'
pvcreate --config "$LVMCONF" --metadatasize 64m /dev/vda
vgcreate --config "$LVMCONF" flotilla /dev/vda
lvcreate --config "$LVMCONF" --type thin-pool --extents 90%FREE --poolmetadatasize 256m \
    --name thinpool flotilla
# --- knfsd exporting an XFS (reflink) to the node and the pods
mkfs.xfs -q -f -m reflink=1 /dev/vdb
mkdir -p /srv/export /run/rpcbind /var/lib/nfs/rpc_pipefs /var/lib/nfs/v4recovery
mount /dev/vdb /srv/export
mount -t nfsd nfsd /proc/fs/nfsd
rpcbind -w
exportfs -o rw,no_root_squash,no_subtree_check,insecure,fsid=0 "*:/srv/export"
rpc.mountd
rpc.nfsd 8
echo Y > /proc/fs/nfsd/v4_end_grace 2>/dev/null || true
phase setup-done
"""

RUN = r"""
cd "$REPO"
export FLOTILLA_CLUSTER_DIR=/var/lib/flotilla-cluster/state
export FLOTILLA_CLUSTER_LOGS=/job/cluster-logs
export FLOTILLA_CLUSTER_TIER=1 FLOTILLA_CLUSTER_POOLS=/job/pools.yaml
export FLOTILLA_CLUSTER_READY_TIMEOUT=900
export PATH="$($PY -c 'from tests.e2e.cluster import tools_dir; print(tools_dir())'):$PATH"
rc=0
if $PY -m tests.cluster.rig up > /job/rig-up.log 2>&1; then
    phase cluster-up
    $PY -m pytest -p no:cacheprovider -p no:hypothesispytest -o timeout=$TEST_TIMEOUT \
        -q -rfEs --junitxml=/job/junit.xml tests/cluster $PYTEST_ARGS || rc=$?
    phase tests-done
    if [ "$rc" != 0 ]; then
        mkdir -p /job/cluster-logs
        export KUBECONFIG=$FLOTILLA_CLUSTER_DIR/admin.kubeconfig
        kubectl get pods -A -o wide > /job/cluster-logs/pods-wide.txt 2>&1 || true
        kubectl describe pods -A > /job/cluster-logs/describe-pods.txt 2>&1 || true
        kubectl get events -A --sort-by=.lastTimestamp > /job/cluster-logs/events.txt 2>&1 || true
        kubectl get pv,pvc,volumesnapshot,volumesnapshotcontent -A -o wide \
            > /job/cluster-logs/volumes.txt 2>&1 || true
        cp -r /var/log/pods /job/cluster-logs/pods 2>/dev/null || true
        cp -r "$FLOTILLA_CLUSTER_DIR/logs" /job/cluster-logs/processes 2>/dev/null || true
    fi
    $PY -m tests.cluster.rig down > /job/rig-down.log 2>&1 || echo $? > /job/down.rc
    phase cluster-down
else
    rc=$?
    echo "rig up failed ($rc)"; tail -50 /job/rig-up.log
    phase cluster-up-failed
fi
dmesg > /job/dmesg.txt 2>&1 || true
lvs --config "$LVMCONF" flotilla > /job/lvs.txt 2>&1 || true
ls -la /srv/export /srv/export/volumes > /job/export.txt 2>&1 || true
exit $rc
"""


def assets_disk() -> tuple[Path, Path, Path]:
    """An ext4 image of the cluster's binaries (scripts/e2e-tools.sh) and images
    (scripts/cluster-images.sh), built (without mounting anything) once per content:
    (image, images directory, binaries directory)."""
    subprocess.run([str(REPO / "scripts/e2e-tools.sh")], check=True, capture_output=True)
    imgs, bins = Path(images()["_dir"]), tools_dir()
    digest = hashlib.sha256()
    total = 0
    for root in (imgs, bins):
        for f in sorted(root.rglob("*")):
            if f.is_file():
                st = f.stat()
                total += st.st_size
                digest.update(f"{root}/{f.relative_to(root)} {st.st_size} "
                              f"{st.st_mtime_ns}\n".encode())
    out = CACHE / f"cluster-assets-{digest.hexdigest()[:16]}.ext4"
    if out.exists():
        return out, imgs, bins
    staging = CACHE / "cluster-assets.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for name, root in (("images", imgs), ("bin", bins)):
            # hard links: same filesystem as the caches, nothing copied
            subprocess.run(["cp", "-al", str(root), str(staging / name)], check=True)
        tmp = out.with_suffix(".tmp")
        size_kib = (total * 12 // 10 + (256 << 20)) >> 10
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "flotilla-assets", "-E",
                        "root_owner=0:0", "-d", str(staging), str(tmp), f"{size_kib}k"],
                       check=True)
        for old in CACHE.glob("cluster-assets-*.ext4"):
            old.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, imgs, bins


def cluster_job(pytest_args: str = "") -> GuestJob:
    mods = module_tree(kernel())
    assets, asset_images, asset_bin = assets_disk()
    script = (f"PY={shlex.quote(sys.executable)}\nREPO={shlex.quote(str(REPO))}\n"
              f"cat > /job/pools.yaml <<'EOF'\n{json.dumps(POOLS)}\nEOF\n"
              f"{SETUP}{RUN}")
    return GuestJob(script, modules=MODULES, hide=HIDE, disks=(24 * GiB, 24 * GiB, 16 * GiB),
                    timeout=GUEST_TIMEOUT, memory_mib=10240, cpus=2, tmpfs_size="6g",
                    ro_disks=(assets,),
                    env=(("MODULE_TREE", str(mods)), ("NODE_IP", NODE_IP),
                         ("ASSET_IMAGES", str(asset_images)), ("ASSET_BIN", str(asset_bin)),
                         ("PYTEST_ARGS", pytest_args), ("TEST_TIMEOUT", "1800"),
                         ("PYTHONDONTWRITEBYTECODE", "1")),
                    expected_seconds=1800)




def phases(result: GuestResult) -> dict[str, int]:
    path = result.jobdir / "phases"
    if not path.exists():
        return {}
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def check(result: GuestResult) -> None:
    """Print what the guest ran and raise AssertionError unless it all passed."""
    print(result.output[-6000:])
    print(f"[guest] cluster tier: rc={result.returncode} in {result.seconds:.0f}s wall; "
          f"phases (s since the job started): {phases(result)}")
    junit = result.jobdir / "junit.xml"
    assert junit.exists(), f"the guest wrote no JUnit report\n{result.describe()}"
    suite = ET.parse(junit).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    cases = {c.get("name", ""): c for c in suite.iter("testcase")}
    failed = [n for n, c in cases.items()
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = {n for n, c in cases.items() if c.find("skipped") is not None}
    for name in cases:
        state = "FAILED" if name in failed else "skipped" if name in skipped else "passed"
        print(f"[guest]   {state:8} {name}")
    print(f"[guest] {len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped")
    assert not failed, f"failed in the guest: {failed}\n{result.describe()}"
    for pool, names in MUST_RUN.items():
        for name in names:
            case = f"{name}[{pool}]"
            assert case in cases and case not in skipped, \
                f"{case} did not run in the guest\n{result.describe()}"
    down_rc = result.jobdir / "down.rc"
    assert not down_rc.exists(), \
        f"cluster-down failed or left something behind:\n{_read(result.jobdir / 'rig-down.log')}"
    assert result.ok, result.describe()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except FileNotFoundError:
        return ""


def main(argv: list[str]) -> int:
    job = cluster_job(shlex.join(argv))
    jobdir = Path("/var/tmp/flotilla-cluster-guest")
    result = run_in_guest(job.script, modules=job.modules, disks=job.disks,
                          timeout=job.timeout, jobdir=jobdir, env=dict(job.env),
                          memory_mib=job.memory_mib, cpus=job.cpus,
                          tmpfs_size=job.tmpfs_size, hide=job.hide, ro_disks=job.ro_disks)
    try:
        check(result)
    except AssertionError as err:
        print(f"FAILED: {err}\n(job directory kept: {jobdir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
