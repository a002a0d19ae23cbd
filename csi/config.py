"""The driver's YAML configuration (``--pool-config``) and its embedded default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from csi.backup.targets import build_targets
from csi.errors import InvalidArgument

DEFAULT_STATE_DIR = "/var/lib/flotilla"
DEFAULT_ALLOWED_ROOTS = ("/var/lib/kubelet",)

EMBEDDED_DEFAULT = """\
# Embedded default for `flotilla --mode all` without --pool-config: one file-backed thin
# pool under the state directory (/var/lib/flotilla/pools/default). On a host
# filesystem without reflink, the pool creates and mounts its own sparse XFS
# (reflink=1) image beside the directory.
pools:
  - name: default
    type: filepool
    path: {state_dir}/pools/default
    loop_image_size: 20Gi
"""


@dataclass
class Config:
    pools: list[dict[str, Any]]
    allowed_roots: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOWED_ROOTS))
    max_volumes_per_node: int = 256
    backup_targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def default_pool(self) -> str:
        return str(self.pools[0]["name"])


def parse_config(text: str, origin: str = "config") -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{origin}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{origin}: expected a mapping with a 'pools' list")
    unknown = sorted(set(data) - {"pools", "allowed_roots", "max_volumes_per_node",
                                 "backup_targets"})
    if unknown:
        raise InvalidArgument(f"{origin}: unknown key(s) {', '.join(unknown)}")
    pools = data.get("pools")
    if not isinstance(pools, list) or not pools:
        raise InvalidArgument(f"{origin}: 'pools' must be a non-empty list")
    names = set()
    for entry in pools:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidArgument(f"{origin}: every pool needs a 'name' and a 'type'")
        if entry["name"] in names:
            raise InvalidArgument(f"{origin}: pool name {entry['name']!r} is used twice")
        names.add(entry["name"])
    roots = data.get("allowed_roots", list(DEFAULT_ALLOWED_ROOTS))
    if not isinstance(roots, list) or not all(
        isinstance(r, str) and os.path.isabs(r) for r in roots
    ):
        raise InvalidArgument(f"{origin}: 'allowed_roots' must be a list of absolute paths")
    max_vols = data.get("max_volumes_per_node", 256)
    if isinstance(max_vols, bool) or not isinstance(max_vols, int) or max_vols < 0:
        raise InvalidArgument(f"{origin}: 'max_volumes_per_node' must be an integer >= 0")
    targets = data.get("backup_targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise InvalidArgument(f"{origin}: 'backup_targets' must be a list of mappings")
    build_targets(targets)  # options checked at start-up; nothing is contacted
    return Config(pools=pools, allowed_roots=[os.path.normpath(r) for r in roots],
                  max_volumes_per_node=max_vols, backup_targets=targets)


def load_config(path: str | None, state_dir: str = DEFAULT_STATE_DIR) -> Config:
    if path is None:
        text = EMBEDDED_DEFAULT.format(state_dir=os.path.abspath(state_dir))
        return parse_config(text, "embedded default")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise InvalidArgument(f"cannot read pool config {path}: {err.strerror}") from None
    return parse_config(text, path)
