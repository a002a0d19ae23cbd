"""``nfs``: one directory per volume on an existing NFS export (ReadWriteMany).

The controller mounts the export at ``mount_dir`` and keeps, on the export itself::

    volumes/<uid>/        a volume's data; nodes mount server:/share/volumes/<uid>
    volumes/<uid>.json    its metadata (name, recorded size, source)
    .snapshots/<uid>/     a snapshot: a copy of the volume's tree, never mounted by nodes
    .snapshots/<uid>.json
    .tmp/<owner>/         trees one process is building (its own: removed at its start)
    .tmp/<owner>.lock     held (flock) by the process that owns .tmp/<owner>/
    retained/, archived/  where deleted volumes go with on_delete: retain / archive

The volume id (``<pool>:vol-<uid>``) names the pool, whose configuration names the
server and share, and the uid names the directory: nothing else is needed to find a
volume. Snapshots, clones and restores copy the tree file by file with ``FICLONE``,
which an NFSv4.2 client sends as one CLONE operation per file, so on a reflink export
(XFS reflink=1, btrfs) they cost O(extents); when the server cannot clone, the file is
copied instead, and the log and the ``flotilla_nfs_*_files`` gauges say which happened.

Every process that starts the pool (controller replicas, every node plugin) shares the
export, so each builds in a scratch directory of its own: ``<owner>`` is the process's
:attr:`~csi.pools.base.Pool.instance` (node id and mode; the host name when unset), made
unique by the lock beside it (a second process of the same instance takes
``<owner>.2``...). At start a process removes only what its own directory holds; other
owners' directories are left alone and logged, because no lock on an NFS export can prove
their owner gone on every client (``nolock`` mounts keep locks local). Renames from
``.tmp/<owner>/`` into ``volumes/`` stay on one filesystem, so commits remain atomic.

Capacity: the requested size is recorded, reported and grown by ControllerExpandVolume.
NFS itself enforces nothing per directory; with ``quota_path`` (this host sees the share
on its own XFS mounted with prjquota, e.g. the controller runs on the NFS server) each
volume directory gets an XFS project quota of its size, raised on expansion.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time

from csi.config import DEFAULT_STATE_DIR
from csi.errors import (
    CommandFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from csi.faults import crashpoint
from csi.pools.access import Access, NetworkAccess
from csi.pools.base import (
    Capacity,
    Condition,
    Options,
    Pool,
    Snapshot,
    Volume,
    VolumeRequest,
    check_compatible,
    new_id,
)
from csi.pools.index import Fill, ThinBudget, filesystem_usage
from csi.pools.store import ObjectStore, remove_path
from csi.system import TIMEOUT_MOUNT, System

log = logging.getLogger(__name__)

#: scratch directories one host may hold per pool instance before start-up gives up
MAX_SCRATCH_OWNERS = 64
_OWNER_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: a tree an older version built directly in .tmp/ (before per-owner scratch)
_LEGACY_TMP = re.compile(r"^(vol|snap)-[0-9a-f]{32}(\.json)?$")


def scratch_owner(instance: str) -> str:
    """A directory name for a pool instance (node ids are DNS names already)."""
    name = _OWNER_UNSAFE.sub("_", instance).strip(".") or "flotilla"
    return name[:100]


class NfsPool(Pool):
    type = "nfs"
    node_local = False  # shared: any node mounts it; driven by the controller itself
    multi_node = True
    block = False
    network = True
    node_expansion = False

    def __init__(self, name: str, options: dict[str, object], system: System) -> None:
        super().__init__(name, options)
        self.system = system
        opts = Options(name, options)
        self.server = opts.text("server")
        self.share = opts.text("share")
        if not self.share.startswith("/") or ".." in self.share.split("/"):
            raise InvalidArgument(f"pool {name!r}: share {self.share!r} must be an absolute "
                                  "export path without '..'")
        raw = options.get("mount_options", ["nfsvers=4.2"])
        opts.used.add("mount_options")
        if isinstance(raw, str):
            raw = [o for o in raw.split(",") if o]
        if not isinstance(raw, list) or not all(isinstance(o, str) and o for o in raw):
            raise InvalidArgument(f"pool {name!r}: mount_options must be a list of strings, "
                                  "e.g. [nfsvers=4.2, hard]")
        self.mount_options = tuple(raw)
        self.on_delete = opts.text("on_delete", "delete")
        if self.on_delete not in ("delete", "retain", "archive"):
            raise InvalidArgument(f"pool {name!r}: on_delete must be delete, retain or "
                                  f"archive, not {self.on_delete!r}")
        self.clone_mode = opts.text("clone", "auto")
        if self.clone_mode not in ("auto", "copy"):
            raise InvalidArgument(f"pool {name!r}: clone must be auto or copy")
        self.overprovision_ratio = opts.number("overprovision_ratio", 10.0, 0.01, 1000.0)
        self.max_used_percent = opts.number("max_used_percent", 95.0, 1.0, 100.0)
        self.default_size = opts.size("default_volume_size", 1 << 30) or (1 << 30)
        self.dir_mode = int(opts.text("dir_mode", "0777"), 8)
        mount_dir = opts.optional_text("mount_dir")
        #: None: ``<state_dir>/nfs/<pool>``, resolved when the pool starts (see mount_dir)
        self._mount_dir_option = os.path.abspath(mount_dir) if mount_dir else None
        self.mount_timeout = opts.number("mount_timeout", TIMEOUT_MOUNT, 1.0, 600.0)
        # where this host sees the share's directory on its own XFS (mounted with prjquota),
        # e.g. when the controller runs on the NFS server: enables per-volume quotas
        quota_path = opts.optional_text("quota_path")
        self.quota_path = os.path.abspath(quota_path) if quota_path else None
        opts.finish()
        self.granularity = 1 << 20
        self.store = ObjectStore(name, system, self._store_dirs(), "", "nfs")
        self.index = self.store.index
        self.budget = ThinBudget(self.index, f"pool {name!r}", self.overprovision_ratio)
        self.counts = {"clone": 0, "copy": 0}
        self._counts_lock = threading.Lock()
        self._mounted_here = False
        self._quota_fs = ""
        self._scratch_fd: int | None = None

    @property
    def mount_dir(self) -> str:
        """Where this process mounts the export: the ``mount_dir`` option, else
        ``<state_dir>/nfs/<pool>`` under the driver's --state-dir (set at wiring time),
        like every other host path the driver keeps."""
        if self._mount_dir_option is not None:
            return self._mount_dir_option
        return os.path.join(os.path.abspath(self.state_dir or DEFAULT_STATE_DIR), "nfs",
                            self.name)

    def _store_dirs(self) -> dict[str, str]:
        return {"volumes": os.path.join(self.mount_dir, "volumes"),
                "snapshots": os.path.join(self.mount_dir, ".snapshots"),
                "tmp": os.path.join(self.mount_dir, ".tmp")}

    @property
    def export(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"{host}:{self.share}"

    # ---- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self.store.dirs.update(self._store_dirs())  # state_dir is known by now
        os.makedirs(self.mount_dir, exist_ok=True)
        current = self.system.mount_at(self.mount_dir)
        if current is not None and not self.system.path_alive(self.mount_dir):
            log.warning("pool %s: export mount at %s is stale; remounting", self.name,
                        self.mount_dir)
            self.system.umount_network(self.mount_dir)
            current = None
        if current is None:
            try:
                self.system.mount(self.export, self.mount_dir, "nfs", self.mount_options,
                                  timeout=self.mount_timeout)
            except CommandFailed as err:
                raise Unavailable(f"pool {self.name!r}: cannot mount {self.export} "
                                  f"({','.join(self.mount_options)}): {err}") from None
            self._mounted_here = True
        elif current.source.rstrip("/") != self.export.rstrip("/"):
            raise Unavailable(f"pool {self.name!r}: {self.mount_dir} already has "
                              f"{current.source} mounted, not {self.export}")
        else:
            self._mounted_here = True  # our own mount, left by a previous run: adopt it
        try:
            self._prepare()
        except BaseException:
            self.stop()  # leave no mount behind a failed start
            raise

    def _claim_scratch(self) -> None:
        """Take this process's own scratch directory ``.tmp/<owner>`` (module docstring):
        the first ``<owner>[.N]`` whose lock file this process can flock."""
        root = os.path.join(self.mount_dir, ".tmp")
        os.makedirs(root, exist_ok=True)
        base = scratch_owner(self.instance or os.uname().nodename)
        for n in range(1, MAX_SCRATCH_OWNERS + 1):
            owner = base if n == 1 else f"{base}.{n}"
            fd = self.system.try_lock(os.path.join(root, owner + ".lock"))
            if fd is None:
                continue
            self._scratch_fd = fd
            self.store.dirs["tmp"] = os.path.join(root, owner)
            self._log_others(root, owner)
            return
        raise Unavailable(f"pool {self.name!r}: {MAX_SCRATCH_OWNERS} processes named "
                          f"{base!r} hold scratch directories in {root}; is --node-id "
                          "the same on every node?")

    def _log_others(self, root: str, owner: str) -> None:
        """Say what other owners (or an older version) left in .tmp/: never removed
        here, since their process may still be building there."""
        for entry in sorted(os.listdir(root)):
            if entry in (owner, owner + ".lock") or entry.endswith(".lock"):
                continue
            what = ("left by an older version" if _LEGACY_TMP.match(entry) else
                    "the scratch space of another process")
            log.info("pool %s: %s is %s; left alone (remove it by hand once no process "
                     "of this pool has built there for a while)", self.name,
                     os.path.join(root, entry), what)

    def _prepare(self) -> None:
        self._claim_scratch()
        self.store.make_dirs()
        for d in ("retained", "archived"):
            os.makedirs(os.path.join(self.mount_dir, d), exist_ok=True)
        os.chmod(self.store.dirs["snapshots"], 0o700)
        self.store.load()
        if self.quota_path is not None:
            self._quota_fs = self._quota_filesystem()
            for vol in self.list_volumes():  # converge quotas a crash may have skipped
                self._set_quota(vol)

    def stop(self) -> None:
        if self._scratch_fd is not None:
            self.system.unlock(self._scratch_fd)  # releases .tmp/<owner> for the next one
            self._scratch_fd = None
        if self._mounted_here:
            self.system.umount_network(self.mount_dir)
            self._mounted_here = False

    def check(self) -> None:
        if self.system.mount_at(self.mount_dir) is None:
            raise Unavailable(f"pool {self.name!r}: {self.export} is not mounted")
        if not self.system.path_alive(self.mount_dir):
            raise Unavailable(f"pool {self.name!r}: {self.export} does not answer "
                              "(stale handle or server down)")

    def _require_alive(self) -> None:
        """Fail fast instead of blocking a worker on a dead server's hard mount."""
        if not self.system.path_alive(self.mount_dir):
            raise Unavailable(f"pool {self.name!r}: {self.export} does not answer (stale "
                              "handle or server down); retry when it is back")

    # ---- capacity -------------------------------------------------------------------

    def _usage(self) -> tuple[int, int, list[Fill]]:
        """Physical size and use of the export, and its fill level."""
        st = self.system.statfs(self.mount_dir)  # a child with a timeout: never hangs
        if st is None:
            raise Unavailable(f"pool {self.name!r}: {self.export} does not answer (stale "
                              "handle or server down); retry when it is back")
        return filesystem_usage(st, self.max_used_percent)

    def capacity(self) -> Capacity:
        size, used, fills = self._usage()
        b = self.budget.state(size, fills)
        with self._counts_lock:
            extra = {"flotilla_nfs_cloned_files": float(self.counts["clone"]),
                     "flotilla_nfs_copied_files": float(self.counts["copy"])}
        return Capacity(size=size, used=used, provisioned=b.provisioned, available=b.available,
                        volumes=b.volumes, snapshots=b.snapshots, extra=extra)

    def _reserve(self, extra: int) -> contextlib.AbstractContextManager[None]:
        size, _, fills = self._usage()
        return self.budget.reserve(size, fills, extra)

    # ---- quotas ---------------------------------------------------------------------

    def _quota_filesystem(self) -> str:
        """The mount point of the XFS holding ``quota_path``; it must enforce prjquota."""
        assert self.quota_path is not None
        marker = os.path.join(self.quota_path, ".flotilla-quota-probe")
        open(marker, "w").close()
        try:
            if not os.path.exists(os.path.join(self.mount_dir, ".flotilla-quota-probe")):
                raise Unavailable(f"pool {self.name!r}: quota_path {self.quota_path} is not "
                                  f"the directory exported as {self.export}")
        finally:
            os.unlink(marker)
        target = self.system.run(["findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", "-T",
                                  self.quota_path]).stdout.split()
        if len(target) < 3 or target[1] != "xfs" or not any(
                o in target[2].split(",") for o in ("prjquota", "pquota")):
            raise Unavailable(f"pool {self.name!r}: quota_path {self.quota_path} must be on "
                              "XFS mounted with -o prjquota to enforce volume sizes")
        return target[0]

    def _set_quota(self, vol: Volume) -> None:
        """An XFS project quota of the volume's size on its directory (idempotent)."""
        if self.quota_path is None:
            return
        uid = self.store.uid(vol.id, "vol")
        assert uid is not None
        project = int(uid[:8], 16) % 0x7FFFFFFE + 1
        directory = os.path.join(self.quota_path, "volumes", uid)
        self.system.run(["xfs_quota", "-x", "-c", f"project -s -p {directory} {project}",
                         "-c", f"limit -p bhard={vol.size} {project}", self._quota_fs])

    # ---- copying trees --------------------------------------------------------------

    def copy_tree(self, src: str, dst: str) -> dict[str, int]:
        """Copy a directory tree like ``cp -a`` (modes, owners, times, symlinks,
        special files); regular files are cloned where the server can."""
        counts = {"clone": 0, "copy": 0}
        dirs: list[tuple[str, os.stat_result]] = []

        def walk(s: str, d: str) -> None:
            st = os.lstat(s)
            os.mkdir(d, 0o700)
            dirs.append((d, st))
            with os.scandir(s) as entries:
                for e in entries:
                    sp, dp = e.path, os.path.join(d, e.name)
                    est = e.stat(follow_symlinks=False)
                    if stat.S_ISDIR(est.st_mode):
                        walk(sp, dp)
                        continue
                    if stat.S_ISLNK(est.st_mode):
                        os.symlink(os.readlink(sp), dp)
                    elif stat.S_ISREG(est.st_mode):
                        counts[self.system.clone_or_copy(sp, dp, self.clone_mode == "auto")] += 1
                    elif stat.S_ISFIFO(est.st_mode):
                        os.mkfifo(dp, 0o600)
                    elif stat.S_ISCHR(est.st_mode) or stat.S_ISBLK(est.st_mode):
                        os.mknod(dp, est.st_mode, est.st_rdev)
                    else:
                        continue  # sockets are not data
                    _copy_stat(dp, est)

        walk(src, dst)
        for d, st in reversed(dirs):  # children first: their times are set last
            _copy_stat(d, st)
        with self._counts_lock:
            for k, v in counts.items():
                self.counts[k] += v
        return counts

    # ---- volumes --------------------------------------------------------------------

    def get_volume(self, volume_id: str) -> Volume | None:
        """From the index, else from the export: in distributed mode the controller
        creates volumes that a node's pool has not loaded yet."""
        vol = self.index.volume(volume_id) or self._reread("volumes", volume_id)
        return vol if isinstance(vol, Volume) else None

    def find_volume(self, name: str) -> Volume | None:
        return self.index.volume_named(name)

    def list_volumes(self) -> list[Volume]:
        return self.index.volumes()

    def volume_dir(self, volume_id: str) -> str:
        return self.store.path("volumes", volume_id)

    def create_volume(self, req: VolumeRequest) -> Volume:
        if req.block:
            raise InvalidArgument(f"pool {self.name!r} (nfs) serves filesystem volumes only")
        self._require_alive()
        existing = self.find_volume(req.name)
        if existing is not None:
            check_compatible(existing, req)
            self._set_quota(existing)  # a crash may have come between commit and quota
            return existing
        source = self.source_of(req)
        source_dir = None if source is None else self.store.payload(source)
        volume = Volume(id=new_id(self.name, "vol"), name=req.name, pool=self.name,
                        size=req.size, fs_type="", source=req.source,
                        parameters=dict(req.parameters))

        def make(tmp: str) -> None:
            if source_dir is None:
                os.mkdir(tmp)
            else:
                counts = self.copy_tree(source_dir, tmp)
                crashpoint("nfs.create.copied")
                log.info("pool %s: %s from %s: %d files cloned server-side, %d copied",
                         self.name, req.name, req.source, counts["clone"], counts["copy"])
            os.chmod(tmp, self.dir_mode)

        with self._reserve(req.size):
            self.store.build(volume, make)
        self._set_quota(volume)
        log.info("pool %s: created volume %s (%s) %d bytes", self.name, volume.id,
                 volume.name, volume.size)
        return volume

    def delete_volume(self, volume_id: str) -> None:
        if self.store.uid(volume_id, "vol") is None:
            return
        self._require_alive()
        self.store.remove("volumes", volume_id, self._dispose)

    def _dispose(self, payload: str) -> None:
        uid = os.path.basename(payload)
        if self.on_delete == "delete":
            remove_path(payload)
        elif self.on_delete == "retain":
            os.rename(payload, os.path.join(self.mount_dir, "retained", uid))
        else:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            os.rename(payload, os.path.join(self.mount_dir, "archived", f"{stamp}-{uid}"))
        log.info("pool %s: volume directory %s: on_delete=%s", self.name, uid,
                 self.on_delete)

    def expand_volume(self, volume_id: str, size: int) -> Volume:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        if size <= vol.size:
            return vol
        self._require_alive()
        with self._reserve(size - vol.size):
            grown = self.store.update(vol, size=size)
        self._set_quota(grown)
        return grown

    def volume_condition(self, volume_id: str) -> Condition:
        if self.get_volume(volume_id) is None:
            return Condition(True, "volume metadata is missing")
        if not self.system.path_alive(self.mount_dir):
            return Condition(True, f"{self.export} does not answer (stale handle or server "
                                   "down)")
        if not os.path.isdir(self.volume_dir(volume_id)):
            return Condition(True, "volume directory is missing on the export")
        return Condition(False, "volume is healthy")

    # ---- snapshots ------------------------------------------------------------------

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        snap = self.index.snapshot(snapshot_id) or self._reread("snapshots", snapshot_id)
        return snap if isinstance(snap, Snapshot) else None

    def _reread(self, kind: str, object_id: str) -> Volume | Snapshot | None:
        """An object missing from the index, read from the export when it answers."""
        if self.store.uid(object_id, "vol" if kind == "volumes" else "snap") is None \
                or not self.system.path_alive(self.mount_dir):
            return None
        return self.store.reload(kind, object_id)

    def find_snapshot(self, name: str) -> Snapshot | None:
        return self.index.snapshot_named(name)

    def list_snapshots(self) -> list[Snapshot]:
        return self.index.snapshots()

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        self._require_alive()
        found = self.snapshot_request(name, source_volume_id)
        if isinstance(found, Snapshot):
            return found
        vol = found
        size, _, fills = self._usage()
        self.budget.refuse(size, fills)
        snap = Snapshot(id=new_id(self.name, "snap"), name=name, pool=self.name,
                        source_volume_id=vol.id, size=vol.size, parameters=dict(parameters))
        started = time.monotonic()
        counts: dict[str, int] = {}

        def make(tmp: str) -> None:
            counts.update(self.copy_tree(self.volume_dir(vol.id), tmp))
            crashpoint("nfs.snapshot.copied")
            os.chmod(tmp, 0o500)  # read-only top; the tree is never mounted by nodes

        self.store.build(snap, make)
        method = "clone" if counts.get("clone") and not counts.get("copy") else (
            "copy" if counts.get("copy") and not counts.get("clone") else "mixed")
        log.info("pool %s: snapshot %s of %s in %.3fs: %d files cloned server-side, %d "
                 "copied (%s)", self.name, snap.id, vol.id, time.monotonic() - started,
                 counts.get("clone", 0), counts.get("copy", 0), method)
        return snap

    def delete_snapshot(self, snapshot_id: str) -> None:
        if self.store.uid(snapshot_id, "snap") is None:
            return
        self._require_alive()
        self.store.remove("snapshots", snapshot_id, _remove_readonly_tree)

    # ---- node side: a network mount, no block device -------------------------------

    def node_access(self, volume_id: str) -> Access:
        return NetworkAccess(self, volume_id)

    def mount_source(self, volume_id: str) -> str:
        uid = self.store.uid(volume_id, "vol")
        if uid is None:
            raise NotFound(f"volume {volume_id} is not in pool {self.name!r}")
        return f"{self.export.rstrip('/')}/volumes/{uid}"

    def attach(self, volume_id: str) -> str:
        raise FailedPrecondition(f"pool {self.name!r} (nfs) volumes are mounted over the "
                                 "network, not attached as block devices")

    def detach(self, volume_id: str) -> None:
        return None

    def device_of(self, volume_id: str) -> str | None:
        return None

    def refresh_device(self, volume_id: str) -> int:
        vol = self.get_volume(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol.size


def _copy_stat(path: str, st: os.stat_result) -> None:
    """Owner, mode and times of ``st`` onto ``path`` (not following symlinks)."""
    with contextlib.suppress(PermissionError):
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(NotImplementedError, OSError):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _remove_readonly_tree(path: str) -> None:
    """Snapshots are made read-only at the top: allow their removal first."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(path, 0o700)
    remove_path(path)
