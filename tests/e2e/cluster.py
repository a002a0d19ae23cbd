"""A Kubernetes control plane as local processes, and a minimal REST client for it.

kine (SQLite) + kube-apiserver + kube-controller-manager + snapshot-controller, all on
127.0.0.1 with ports picked free, in a work directory. No kubelet, scheduler or
container runtime: tests play those parts. Every process is started here, remembered by
PID and stopped by PID (SIGTERM, then SIGKILL) in :meth:`ControlPlane.stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO

ADMIN_TOKEN = "flotilla-e2e-admin"


def tools_dir() -> Path:
    out = subprocess.run([str(REPO / "scripts/e2e-tools.sh"), "--print"], check=True,
                         capture_output=True, text=True).stdout.strip()
    return Path(out)


def missing_tools(names: list[str]) -> list[str]:
    bindir = tools_dir()
    return [n for n in names if not os.access(bindir / n, os.X_OK)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


# path segments for the kinds the tests use: kind -> (plural, namespaced)
KINDS = {
    "Namespace": ("namespaces", False), "Node": ("nodes", False),
    "PersistentVolumeClaim": ("persistentvolumeclaims", True),
    "PersistentVolume": ("persistentvolumes", False),
    "CSINode": ("csinodes", False), "CSIDriver": ("csidrivers", False),
    "StorageClass": ("storageclasses", False),
    "CSIStorageCapacity": ("csistoragecapacities", True),
    "CustomResourceDefinition": ("customresourcedefinitions", False),
    "VolumeSnapshot": ("volumesnapshots", True),
    "VolumeSnapshotContent": ("volumesnapshotcontents", False),
    "VolumeSnapshotClass": ("volumesnapshotclasses", False),
    "FlotillaVolume": ("flotillavolumes", False),
    "FlotillaSnapshot": ("flotillasnapshots", False),
    "FlotillaNode": ("flotillanodes", False),
    "ConfigMap": ("configmaps", True), "Event": ("events", True),
    "Pod": ("pods", True), "StatefulSet": ("statefulsets", True),
    "Deployment": ("deployments", True), "DaemonSet": ("daemonsets", True),
}
GROUP_VERSION = {
    "PersistentVolumeClaim": "v1", "PersistentVolume": "v1", "Namespace": "v1", "Node": "v1",
    "ConfigMap": "v1", "Event": "v1", "Pod": "v1",
    "StatefulSet": "apps/v1", "Deployment": "apps/v1", "DaemonSet": "apps/v1",
    "CSINode": "storage.k8s.io/v1", "CSIDriver": "storage.k8s.io/v1",
    "StorageClass": "storage.k8s.io/v1", "CSIStorageCapacity": "storage.k8s.io/v1",
    "CustomResourceDefinition": "apiextensions.k8s.io/v1",
    "VolumeSnapshot": "snapshot.storage.k8s.io/v1",
    "VolumeSnapshotContent": "snapshot.storage.k8s.io/v1",
    "VolumeSnapshotClass": "snapshot.storage.k8s.io/v1",
    "FlotillaVolume": "flotilla.csi.io/v1alpha1", "FlotillaSnapshot": "flotilla.csi.io/v1alpha1",
    "FlotillaNode": "flotilla.csi.io/v1alpha1",
}


@dataclass
class Kube:
    """Just enough REST: JSON in, JSON out, bearer token, the cluster's self-signed TLS."""

    server: str
    token: str

    def __post_init__(self) -> None:
        self._ctx = ssl.create_default_context()
        self._ctx.check_hostname = False
        self._ctx.verify_mode = ssl.CERT_NONE

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.read().decode()) from None
        if raw:
            return text
        return json.loads(text) if text else None

    @staticmethod
    def path(kind: str, name: str = "", namespace: str = "") -> str:
        plural, namespaced = KINDS[kind]
        gv = GROUP_VERSION[kind]
        base = "/api/v1" if gv == "v1" else f"/apis/{gv}"
        if namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{plural}"
        return f"{base}/{name}" if name else base

    def create(self, obj: dict[str, Any], namespace: str = "") -> Any:
        ns = namespace or obj.get("metadata", {}).get("namespace", "")
        return self.request("POST", self.path(obj["kind"], namespace=ns), obj)

    def get(self, kind: str, name: str, namespace: str = "") -> Any:
        try:
            return self.request("GET", self.path(kind, name, namespace))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str = "", selector: str = "") -> list[Any]:
        path = self.path(kind, namespace=namespace)
        if selector:
            path += "?labelSelector=" + urllib.request.quote(selector)
        items: list[Any] = self.request("GET", path)["items"]
        return items

    def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "") -> Any:
        return self.request("PATCH", self.path(kind, name, namespace), patch,
                            "application/merge-patch+json")

    def delete(self, kind: str, name: str, namespace: str = "") -> None:
        with contextlib.suppress(ApiError):
            self.request("DELETE", self.path(kind, name, namespace))

    def wait(self, what: str, fn: Callable[[], Any], timeout: float = 120.0,
             interval: float = 0.5) -> Any:
        return wait_for(what, fn, timeout, interval)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 120.0, interval: float = 0.5,
             *, ignore: tuple[type[BaseException], ...] = (),
             check: Callable[[], None] | None = None, detail: Callable[[], str] | None = None,
             error: type[Exception] = AssertionError) -> Any:
    """Call `fn` until it returns something truthy, and return that. An exception in
    `ignore` counts as "not yet"; `check` runs before each try and gives up early by
    raising; past `timeout` seconds, `error` names `what` (and `detail()`)."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        try:
            value = fn()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise error(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(interval)


def snapshot_crds() -> list[Path]:
    """The snapshot CRDs of external-snapshotter's client module (Go module cache)."""
    out = subprocess.run(
        ["go", "mod", "download", "-json",
         "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.6.0"],
        check=True, capture_output=True, text=True, cwd="/").stdout
    directory = Path(json.loads(out)["Dir"]) / "config" / "crd"
    return sorted(directory.glob("snapshot.storage.k8s.io_*.yaml"))


def kubeconfig(path: Path, server: str, token: str, user: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server,
                                                 "insecure-skip-tls-verify": True}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }))
    path.chmod(0o600)
    return path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@dataclass
class ControlPlane:
    workdir: Path
    bindir: Path = field(default_factory=tools_dir)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = self.workdir / "cluster"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.kube = Kube(self.server, ADMIN_TOKEN)
        self.admin_kubeconfig = kubeconfig(self.dir / "admin.kubeconfig", self.server,
                                           ADMIN_TOKEN, "admin")

    # ---- processes ------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as logf:
            popen = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=self.dir,
                                     start_new_session=True)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited {p.popen.returncode}:\n"
                                     f"{p.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM every process (newest first), by PID; SIGKILL what lingers."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.procs.clear()

    # ---- the control plane ----------------------------------------------------------

    def start(self) -> None:
        d = self.dir
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True,
                       capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out",
                        str(d / "sa.pub")], check=True, capture_output=True)
        (d / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        kine_port = free_port()
        self.spawn("kine", [
            str(self.bindir / "kine"),
            "--endpoint", f"sqlite://{d}/kine.db?_journal=WAL&cache=shared&_busy_timeout=30000",
            "--listen-address", f"127.0.0.1:{kine_port}",
            "--metrics-bind-address", "0",
        ])
        self.spawn("kube-apiserver", [
            str(self.bindir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{kine_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.api_port}",
            "--advertise-address=127.0.0.1", f"--cert-dir={d / 'pki'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--endpoint-reconciler-type=none", "--enable-priority-and-fairness=false",
            "--profiling=false", "--v=1",
        ])
        self.kube.wait("the API server to be ready", self._ready, timeout=120, interval=1)
        self.spawn("kube-controller-manager", [
            str(self.bindir / "kube-controller-manager"),
            f"--kubeconfig={self.admin_kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--use-service-account-credentials=false",
            f"--service-account-private-key-file={d / 'sa.key'}",
            "--controllers=persistentvolume-binder-controller,"
            "persistentvolumeclaim-protection-controller,"
            "persistentvolume-protection-controller,garbage-collector-controller,"
            "serviceaccount-controller,namespace-controller",
            "--v=1",
        ])
        self.spawn("snapshot-controller", [
            str(self.bindir / "snapshot-controller"), f"--kubeconfig={self.admin_kubeconfig}",
            "--leader-election=false", "--v=3",
        ])

    def _ready(self) -> bool:
        self.check_alive()
        try:
            return bool(self.kube.request("GET", "/readyz", raw=True).strip() == "ok")
        except (ApiError, OSError, ValueError):
            return False

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig with a token of the chart's ServiceAccount (as its pods get)."""
        out = self.kube.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": 7200}})
        return kubeconfig(self.dir / f"{name}.kubeconfig", self.server,
                          out["status"]["token"], name)
