"""A pool with backups: what the driver's wiring puts around each pool it drives itself
when backup targets are configured (``--mode all`` and the node plugin's pools).

The servicers and the node agent only call the pool; this wrapper adds what backups
mean to each call:

* ``check_snapshot_parameters`` accepts ``backupTarget`` naming a configured target, on
  a pool that declares :attr:`~csi.pools.base.Pool.backups`;
* ``create_snapshot`` starts the snapshot's backup; the snapshot is not ready (its
  ``message`` says why) until the backup is complete;
* ``get_snapshot`` / ``list_snapshots`` report that readiness;
* ``create_volume`` from a snapshot this pool does not hold restores it from the target
  that has its backup;
* ``delete_snapshot`` deletes its backup too.
"""

from __future__ import annotations

from dataclasses import replace

from csi.backup.manager import BACKUP_PARAMETER, BackupManager
from csi.errors import Unavailable
from csi.pools.base import Pool, PoolWrapper, Snapshot, Volume, VolumeRequest


class BackedUpPool(PoolWrapper):
    def __init__(self, inner: Pool, manager: BackupManager) -> None:
        super().__init__(inner)
        self.manager = manager

    def check_snapshot_parameters(self, parameters: dict[str, str]) -> None:
        self.inner.check_snapshot_parameters(
            {k: v for k, v in parameters.items() if k != BACKUP_PARAMETER})
        self.manager.check_snapshot_parameters(self.inner, parameters)

    def create_volume(self, req: VolumeRequest) -> Volume:
        return self.manager.create_volume(self.inner, req)

    def create_snapshot(self, name: str, source_volume_id: str,
                        parameters: dict[str, str]) -> Snapshot:
        snap = self.inner.create_snapshot(name, source_volume_id, parameters)
        try:
            ready, message = self.manager.ensure_backup(self.inner, snap)
        except Unavailable as err:  # the target is unreachable: not ready, retried later
            ready, message = False, str(err)
        return replace(snap, ready=snap.ready and ready, message=message)

    def _with_backup_state(self, snap: Snapshot) -> Snapshot:
        ready, message = self.manager.backup_state(snap)
        return snap if ready else replace(snap, ready=False, message=message)

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        snap = self.inner.get_snapshot(snapshot_id)
        return self._with_backup_state(snap) if snap is not None else None

    def list_snapshots(self) -> list[Snapshot]:
        return [self._with_backup_state(s) for s in self.inner.list_snapshots()]

    def delete_snapshot(self, snapshot_id: str) -> None:
        snap = self.inner.get_snapshot(snapshot_id)
        self.inner.delete_snapshot(snapshot_id)
        target = snap.parameters.get(BACKUP_PARAMETER) if snap is not None else None
        if target:
            self.manager.delete_backup(snapshot_id, target)
        elif snap is None:  # the pool lost it, or never held it: a backup may remain
            self.manager.forget(snapshot_id)


def with_backups(pool: Pool, backups: BackupManager | None) -> Pool:
    """The pool as this process drives it: wrapped with backups when targets exist."""
    return pool if backups is None else BackedUpPool(pool, backups)
