"""Custom resource bodies, names and the round trip of pool objects and errors.

A ``FlotillaVolume`` / ``FlotillaSnapshot`` is named after the CSI name when that is a
valid object name (``pvc-<uid>`` and ``snapshot-<uid>`` from the sidecars are), else
``x-<sha256 of the name>``: so a repeated CreateVolume finds the resource it created,
and two controllers racing on one name collide on the API server instead of creating
twice. The id the real pool assigned is in ``status.volumeId`` / ``status.snapshotId``.

Phases: ``Pending`` (written by the controller) -> ``Ready`` or ``Failed`` (written by
the node agent). ``status.observedGeneration`` says which spec the status answers;
``status.error`` = ``{reason, message}`` names a class of :mod:`csi.errors`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from csi import errors
from csi.kube import API_VERSION, FINALIZER, KIND_OF, NODE_LABEL, POOL_LABEL, SNAPSHOTS, VOLUMES
from csi.kube.api import Obj
from csi.pools.base import Snapshot, Source, Volume, VolumeRequest

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PENDING, READY, FAILED = "Pending", "Ready", "Failed"

ERROR_CLASSES: dict[str, type[errors.FlotillaError]] = {
    cls.__name__: cls for cls in errors.STATUS_OF
}


def object_name(csi_name: str) -> str:
    """The resource name for a CSI volume or snapshot name."""
    if len(csi_name) <= 253 and NAME_RE.match(csi_name) and not csi_name.startswith("x-"):
        return csi_name
    return "x-" + hashlib.sha256(csi_name.encode()).hexdigest()


LABEL_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """A label value standing for ``value`` (node ids are usually valid already)."""
    if LABEL_RE.match(value):
        return value
    return "x-" + hashlib.sha256(value.encode()).hexdigest()[:60]


def error_status(err: errors.FlotillaError) -> dict[str, str]:
    """``status.error`` for a typed error: the nearest class with a status code."""
    reason = next((c.__name__ for c in type(err).__mro__ if c.__name__ in ERROR_CLASSES),
                  "Internal")
    return {"reason": reason, "message": str(err)[:2000]}


def raise_error(error: dict[str, Any], what: str) -> None:
    """Raise the typed error a status reported."""
    cls = ERROR_CLASSES.get(str(error.get("reason")), errors.Internal)
    raise cls(f"{what}: {error.get('message', 'failed on the node')}")


def meta(obj: Obj) -> dict[str, Any]:
    m: dict[str, Any] = obj.get("metadata", {})
    return m


def spec(obj: Obj) -> dict[str, Any]:
    s: dict[str, Any] = obj.get("spec", {})
    return s


def status(obj: Obj) -> dict[str, Any]:
    s: dict[str, Any] = obj.get("status") or {}
    return s


def deleting(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def answered(obj: Obj) -> bool:
    """Has the node agent answered the current spec?"""
    return int(status(obj).get("observedGeneration", 0)) >= int(meta(obj).get("generation", 1))


def _body(plural: str, name: str, node: str, pool: str, spec_: dict[str, Any]) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND_OF[plural],
        "metadata": {"name": name, "labels": {NODE_LABEL: label_value(node),
                                                    POOL_LABEL: pool},
                     "finalizers": [FINALIZER]},
        "spec": spec_,
    }


# ---- volumes ----------------------------------------------------------------------------

def volume_body(req: VolumeRequest, pool: str, node: str) -> Obj:
    s: dict[str, Any] = {
        "name": req.name, "node": node, "pool": pool, "size": req.size,
        "requiredBytes": req.required, "limitBytes": req.limit, "fsType": req.fs_type,
        "block": req.block, "parameters": dict(req.parameters),
    }
    if req.source is not None:
        s["source"] = {"kind": req.source.kind, "id": req.source.id}
    return _body(VOLUMES, object_name(req.name), node, pool, s)


def request_of(obj: Obj) -> VolumeRequest:
    """The VolumeRequest a FlotillaVolume's spec describes (node agent side)."""
    s = spec(obj)
    src = s.get("source")
    return VolumeRequest(
        name=s["name"], size=int(s["size"]), required=int(s.get("requiredBytes", 0)),
        limit=int(s.get("limitBytes", 0)), fs_type=s.get("fsType", ""),
        block=bool(s.get("block", False)),
        source=Source(src["kind"], src["id"]) if src else None,
        parameters=dict(s.get("parameters") or {}),
    )


def volume_of(obj: Obj) -> Volume:
    """The Volume a Ready FlotillaVolume stands for (controller side)."""
    s, st = spec(obj), status(obj)
    src = s.get("source")
    return Volume(
        id=st["volumeId"], name=s["name"], pool=s["pool"],
        size=int(st.get("size", s["size"])), fs_type=s.get("fsType", ""),
        source=Source(src["kind"], src["id"]) if src else None,
        parameters=dict(s.get("parameters") or {}),
        created=float(st.get("created", 0.0)),
    )


def volume_status(vol: Volume, generation: int) -> dict[str, Any]:
    return {"phase": READY, "volumeId": vol.id, "size": vol.size, "created": vol.created,
            "observedGeneration": generation, "error": None, "message": ""}


# ---- snapshots --------------------------------------------------------------------------

def snapshot_body(name: str, source_volume_id: str, parameters: dict[str, str], pool: str,
                  node: str) -> Obj:
    s = {"name": name, "node": node, "pool": pool, "sourceVolumeId": source_volume_id,
         "parameters": dict(parameters)}
    return _body(SNAPSHOTS, object_name(name), node, pool, s)


def snapshot_of(obj: Obj) -> Snapshot:
    s, st = spec(obj), status(obj)
    return Snapshot(
        id=st["snapshotId"], name=s["name"], pool=s["pool"],
        source_volume_id=s["sourceVolumeId"], size=int(st.get("size", 0)),
        created=float(st.get("created", 0.0)), ready=bool(st.get("readyToUse", True)),
        parameters=dict(s.get("parameters") or {}),
    )


def snapshot_status(snap: Snapshot, generation: int) -> dict[str, Any]:
    return {"phase": READY, "snapshotId": snap.id, "size": snap.size,
            "created": snap.created, "readyToUse": snap.ready,
            "observedGeneration": generation, "error": None, "message": ""}


def failed_status(err: errors.FlotillaError, generation: int,
                  phase: str = FAILED) -> dict[str, Any]:
    return {"phase": phase, "observedGeneration": generation, "error": error_status(err),
            "message": str(err)[:2000]}
