"""A real single-node Kubernetes cluster on this machine, and the chart installed on it.

    python -m tests.cluster.rig up      build what is missing, start, install; print KUBECONFIG
    python -m tests.cluster.rig down    uninstall, stop every process by PID, clean up
    python -m tests.cluster.rig status  what runs

(`make cluster-up` / `make cluster-down` call these.) kine + kube-apiserver +
kube-controller-manager + kube-scheduler + snapshot-controller + kube-proxy + containerd +
kubelet, as processes started here and remembered by PID in the state directory
($FLOTILLA_CLUSTER_DIR, default /var/lib/flotilla-cluster), so `down` in another shell
stops them. No registry is reachable: every image is built by scripts/cluster-images.sh and
imported into containerd; pods use `imagePullPolicy: Never`. The chart is installed by
helm with its default templates; the values name only the local images and the pools.

The kubelet keeps the chart's default paths (root /var/lib/kubelet, the node plugin's
state in /var/lib/flotilla), both made shared mounts for Bidirectional propagation.
`down` removes what `up` made and nothing else: it refuses to run over a kubelet root that
existed before `up`. /var/lib/flotilla may exist (the standalone driver's, e.g. after
`make demo`): the node plugin then serves the pools found there, as it would on any node,
and `down` leaves the mounts and loop devices that were there before `up` as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.cluster import (
    ApiError,
    Kube,
    free_port,
    kubeconfig,
    snapshot_crds,
    tools_dir,
    wait_for,
)
from tests.helpers import REPO

STATE = Path(os.environ.get("FLOTILLA_CLUSTER_DIR", "/var/lib/flotilla-cluster"))
KUBELET_ROOT = Path("/var/lib/kubelet")
NODE_STATE = Path("/var/lib/flotilla")          # the chart's stateDir
FIXED_DIRS = (KUBELET_ROOT, NODE_STATE, Path("/var/log/containers"), Path("/var/log/pods"))
#: fixed directories that may exist before `up`: the standalone driver's state
ADOPTABLE = (NODE_STATE,)
NAMESPACE = "flotilla-system"
RELEASE = "flotilla"
BRIDGE = "flotilla0"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/24"
ADMIN_TOKEN_FILE = "admin.token"
# every process of the cluster, in start order (stopped in reverse)
ORDER = ("kine", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
         "snapshot-controller", "containerd", "kube-proxy", "kubelet")


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, text=True, capture_output=True, **kw)


def configured_pools() -> list[dict[str, Any]]:
    """The chart's `pools`: those of the YAML file $FLOTILLA_CLUSTER_POOLS (a `pools:`
    list, as in a values file), else the chart's default."""
    path = os.environ.get("FLOTILLA_CLUSTER_POOLS")
    source = Path(path) if path else REPO / "charts/flotilla/values.yaml"
    pools: list[dict[str, Any]] = yaml.safe_load(source.read_text())["pools"]
    return pools


def storage_class(pool: dict[str, Any]) -> str:
    """The StorageClass the chart makes for a pool."""
    return str(pool.get("storageClass", {}).get("name") or f"flotilla-{pool['name']}")


def host_ip() -> str:
    """The address pods reach the API server at (the node's InternalIP):
    $FLOTILLA_CLUSTER_IP, else the source address of the default route."""
    if os.environ.get("FLOTILLA_CLUSTER_IP"):
        return os.environ["FLOTILLA_CLUSTER_IP"]
    out = run("ip", "-4", "route", "get", "1.1.1.1").stdout.split()
    return out[out.index("src") + 1]


def node_name() -> str:
    name = socket.gethostname().lower().split(".")[0]
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-") or "node"


def images_dir() -> str:
    return run(str(REPO / "scripts/cluster-images.sh"), "--print").stdout.strip()


def images() -> dict[str, str]:
    """scripts/cluster-images.sh builds the images; images.env names them."""
    out = run(str(REPO / "scripts/cluster-images.sh")).stdout.strip().splitlines()[-1]
    env = Path(out) / "images.env"
    names = dict(line.split("=", 1) for line in env.read_text().split())
    names["_dir"] = out
    return names


def mounts() -> list[tuple[str, str]]:
    """(mount point, source) of every mount, in /proc/self/mountinfo's order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        point = fields[4].encode().decode("unicode_escape")
        found.append((point, fields[sep + 2]))
    return found


def under(path: str, roots: tuple[Path, ...]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + "/") for r in roots)


def loops_backed_under(roots: tuple[Path, ...]) -> list[str]:
    """Loop devices whose backing file lies under `roots`. A loop the node plugin attached
    names its file as the container saw it (``/pools/default.xfs``), so files are matched
    by device and inode, not by the path losetup prints."""
    listing = json.loads(run("losetup", "--list", "--json", "-O",
                             "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN").stdout or "{}")
    loops = listing.get("loopdevices", [])
    if not loops:
        return []
    files = set()
    for root in roots:
        for parent, _, names in os.walk(root):
            for name in names:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(parent, name))
                    files.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    out = []
    for loop in loops:
        major, minor = (int(n) for n in loop["back-maj:min"].split(":"))
        if (major, minor, int(loop["back-ino"])) in files or under(loop["back-file"], roots):
            out.append(loop["name"])
    return out


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_time(pid: int) -> str:
    """The kernel's start time of a PID: tells a recorded process from a reused PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


@dataclass
class Cluster:
    state: Path = STATE

    # ---- the record of what runs --------------------------------------------------------

    @property
    def record_file(self) -> Path:
        return self.state / "cluster.json"

    def record(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def save(self, data: dict[str, Any]) -> None:
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.record_file)

    def running(self) -> dict[str, int]:
        procs = self.record().get("procs", {})
        return {name: p["pid"] for name, p in procs.items()
                if alive(p["pid"]) and start_time(p["pid"]) == p["start"]}

    @property
    def kubeconfig(self) -> Path:
        return self.state / "admin.kubeconfig"

    def kube(self) -> Kube:
        data = self.record()
        return Kube(data["server"], (self.state / ADMIN_TOKEN_FILE).read_text().strip())

    # ---- processes ----------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        logdir = self.state / "logs"
        logdir.mkdir(exist_ok=True)
        with open(logdir / f"{name}.log", "ab") as logf:
            popen = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.state,
                                     env={**os.environ, **(env or {})},
                                     start_new_session=True)
        data = self.record()
        data.setdefault("procs", {})[name] = {"pid": popen.pid,
                                              "start": start_time(popen.pid)}
        self.save(data)

    def check_alive(self, names: tuple[str, ...]) -> None:
        running = self.running()
        for name in names:
            if name not in running:
                tail = (self.state / "logs" / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited:\n{tail}")

    def stop(self, name: str, timeout: float = 60.0) -> None:
        proc = self.record().get("procs", {}).get(name)
        if not proc or not alive(proc["pid"]) or start_time(proc["pid"]) != proc["start"]:
            return
        pid = proc["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:g}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.1)

    def wait(self, what: str, fn: Any, timeout: float = 180.0, interval: float = 1.0,
             procs: tuple[str, ...] = ()) -> Any:
        """Poll `fn` (API and OS errors count as "not yet"); give up as soon as one of
        `procs` has died."""
        return wait_for(what, fn, timeout, interval,
                        ignore=(ApiError, OSError, ValueError, KeyError, TypeError),
                        check=(lambda: self.check_alive(procs)) if procs else None,
                        error=RuntimeError)

    # ---- up -------------------------------------------------------------------------------

    def up(self) -> None:
        if self.running():
            if set(self.running()) == set(ORDER):
                log("the cluster is already up")
                self.print_env()
                return
            raise RuntimeError(f"a partial cluster runs ({sorted(self.running())}): "
                               "run `make cluster-down` first")
        if os.geteuid() != 0:
            raise RuntimeError("the cluster needs root (kubelet, containerd, mounts)")
        for d in FIXED_DIRS:
            if (d.exists() and d not in ADOPTABLE
                    and not self.record().get("made", {}).get(str(d))):
                raise RuntimeError(f"{d} exists and was not made by this cluster: a kubelet "
                                   "may already run here; not touching it")
        t0 = time.monotonic()
        bindir = tools_dir()
        run(str(REPO / "scripts/e2e-tools.sh"))  # builds what is missing
        imgs = images()
        self.state.mkdir(parents=True, exist_ok=True)
        data = self.record() or {}
        data.setdefault("made", {})
        data["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        data["node"] = node_name()
        data["ip"] = host_ip()
        data["t0"] = time.time()
        roots = (self.state, *FIXED_DIRS)
        # what was there before (a standalone driver's pool): down leaves it as it was
        data.setdefault("before", {"mounts": [p for p, _ in mounts() if under(p, roots)],
                                   "loops": loops_backed_under(roots)})
        for d in FIXED_DIRS:
            if not d.exists():
                d.mkdir(parents=True)
                data["made"][str(d)] = True
        self.save(data)
        try:
            self._pki(data["ip"])
            self._control_plane(bindir, data)
            self._node(bindir, imgs, data)
            self._install(bindir, imgs)
        except BaseException:
            log(f"cluster-up failed; logs kept in {self.save_logs()}; cleaning up")
            self.down(uninstall=False)
            raise
        log(f"cluster up in {time.monotonic() - t0:.0f}s")
        self.print_env()

    def print_env(self) -> None:
        print(f"export KUBECONFIG={self.kubeconfig}")
        print(f"export PATH={tools_dir()}:$PATH   # kubectl, helm")
        busybox = (Path(images_dir()) / "images.env").read_text().split("BUSYBOX_IMAGE=")
        if len(busybox) > 1:
            print(f"# no registry here: workload pods can use {busybox[1].split()[0]}")

    def _pki(self, ip: str) -> None:
        pki = self.state / "pki"
        if (pki / "apiserver.crt").exists():
            return
        pki.mkdir(exist_ok=True)

        def ssl(*args: str) -> None:
            run("openssl", *args, cwd=pki)

        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "365", "-subj", "/CN=flotilla-cluster-ca")
        sans = (f"subjectAltName=IP:{ip},IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,"
                "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                "DNS:kubernetes.default.svc.cluster.local")
        for name, subj, ext in (
                ("apiserver", "/CN=kube-apiserver", sans),
                ("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                 "extendedKeyUsage=clientAuth")):
            ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", subj)
            (pki / f"{name}.ext").write_text(ext + "\n")
            ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "365",
                "-extfile", f"{name}.ext")
        ssl("genrsa", "-out", "sa.key", "2048")
        ssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _control_plane(self, bindir: Path, data: dict[str, Any]) -> None:
        d, pki = self.state, self.state / "pki"
        admin = os.urandom(16).hex()
        node_token = os.urandom(16).hex()
        (d / ADMIN_TOKEN_FILE).write_text(admin + "\n")
        (d / "tokens.csv").write_text(
            f'{admin},admin,admin,"system:masters"\n'
            f'{node_token},system:node:{data["node"]},node,"system:nodes"\n')
        for f in (d / ADMIN_TOKEN_FILE, d / "tokens.csv"):
            f.chmod(0o600)
        port, kine_port = free_port(), free_port()
        data["server"] = f"https://{data['ip']}:{port}"
        self.save(data)
        kubeconfig(self.kubeconfig, data["server"], admin, "admin")
        kubeconfig(d / "kubelet.kubeconfig", data["server"], node_token,
                   f"system:node:{data['node']}")
        log("control plane")
        self.spawn("kine", [
            str(bindir / "kine"),
            "--endpoint", f"sqlite://{d}/kine.db?_journal=WAL&cache=shared&_busy_timeout=30000",
            "--listen-address", f"127.0.0.1:{kine_port}", "--metrics-bind-address", "0"])
        self.spawn("kube-apiserver", [
            str(bindir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{kine_port}",
            "--bind-address=0.0.0.0", f"--secure-port={port}",
            f"--advertise-address={data['ip']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--enable-priority-and-fairness=false", "--profiling=false", "--v=1"])
        kube = self.kube()
        self.wait("the API server", lambda: kube.request("GET", "/readyz", raw=True) == "ok",
                  procs=("kine", "kube-apiserver"))
        self.spawn("kube-controller-manager", [
            str(bindir / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1"])
        self.spawn("kube-scheduler", [
            str(bindir / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--profiling=false", "--v=1"])
        for crd in snapshot_crds():
            with contextlib.suppress(ApiError):
                kube.create(yaml.safe_load(crd.read_text()))
        self.spawn("snapshot-controller", [
            str(bindir / "snapshot-controller"), f"--kubeconfig={self.kubeconfig}",
            "--leader-election=false", "--v=2"])

    def _node(self, bindir: Path, imgs: dict[str, str], data: dict[str, Any]) -> None:
        d = self.state
        run_dir = d / "run"
        run_dir.mkdir(exist_ok=True)
        sock = run_dir / "containerd.sock"
        cni_conf = d / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-flotilla.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "flotilla-cluster",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(d / "cni" / "ipam"),
                                  "ranges": [[{"subnet": POD_CIDR}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}]}))
        (d / "containerd.toml").write_text(f"""version = 2
root = "{d / 'containerd'}"
state = "{run_dir / 'containerd'}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'containerd-opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{imgs['PAUSE_IMAGE']}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{run_dir / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bindir / 'cni'}"
    conf_dir = "{cni_conf}"
""")
        log("containerd, images")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        self.spawn("containerd", ["containerd", "--config", str(d / "containerd.toml")])
        self.wait("containerd", lambda: run("ctr", "-a", str(sock), "version",
                                            check=False).returncode == 0,
                  procs=("containerd",))
        tars = sorted(Path(imgs["_dir"]).glob("*.tar"))
        for tar in tars:
            run("ctr", "-a", str(sock), "-n", "k8s.io", "images", "import", str(tar))
        # Bidirectional mount propagation needs shared mounts under the kubelet and the
        # node plugin's state directory
        for shared in (KUBELET_ROOT, NODE_STATE):
            if not any(p == str(shared) for p, _ in mounts()):
                # recursive: a pool mounted there before stays visible to the node plugin
                run("mount", "--rbind", str(shared), str(shared))
            run("mount", "--make-rshared", str(shared))
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "nftables", "hostnameOverride": data["node"], "clusterCIDR": POD_CIDR,
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "conntrack": {"maxPerCore": 0},
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "healthzBindAddress": f"127.0.0.1:{free_port()}"}))
        log("kube-proxy, kubelet")
        self.spawn("kube-proxy", [str(bindir / "kube-proxy"),
                                  f"--config={d / 'kube-proxy.yaml'}", "--v=1"])
        (d / "kubelet.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{sock}",
            "authentication": {"anonymous": {"enabled": False},
                               "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(d / "pki" / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "podLogsDir": "/var/log/pods", "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "port": 10250, "podCIDR": POD_CIDR, "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            # the images cannot be pulled again: never collect them, never evict for disk
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "serializeImagePulls": False, "maxPods": 60,
            "shutdownGracePeriod": "0s",
        }))
        self.spawn("kubelet", [
            str(bindir / "kubelet"), f"--config={d / 'kubelet.yaml'}",
            f"--kubeconfig={d / 'kubelet.kubeconfig'}", f"--root-dir={KUBELET_ROOT}",
            f"--cert-dir={d / 'kubelet-pki'}", f"--hostname-override={data['node']}",
            f"--node-ip={data['ip']}", "--v=1"])
        kube = self.kube()

        def ready() -> bool:
            node = kube.get("Node", data["node"])
            return any(c["type"] == "Ready" and c["status"] == "True"
                       for c in node["status"]["conditions"])
        self.wait("the node to be Ready", ready, timeout=180,
                  procs=("containerd", "kubelet", "kube-apiserver"))

    def values(self, imgs: dict[str, str], pools: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
        """The chart's values: the local images, `Never` pulls, the pools; nothing else."""
        repo, tag = imgs["FLOTILLA_IMAGE"].rsplit(":", 1)
        sidecars = {"provisioner": "CSI_PROVISIONER_IMAGE",
                    "snapshotter": "CSI_SNAPSHOTTER_IMAGE", "resizer": "CSI_RESIZER_IMAGE",
                    "registrar": "CSI_NODE_DRIVER_REGISTRAR_IMAGE",
                    "livenessprobe": "LIVENESSPROBE_IMAGE"}
        values: dict[str, Any] = {
            "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
            "sidecars": {"pullPolicy": "Never",
                         **{k: {"image": imgs[v]} for k, v in sidecars.items()}},
        }
        if pools is not None:
            values["pools"] = pools
        return values

    def helm_env(self) -> dict[str, str]:
        """helm talks to this cluster and keeps its state in the state directory."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "HELM_CACHE_HOME": str(self.state / "helm/cache"),
                "HELM_CONFIG_HOME": str(self.state / "helm/config"),
                "HELM_DATA_HOME": str(self.state / "helm/data")}

    def _install(self, bindir: Path, imgs: dict[str, str]) -> None:
        log("helm install")
        values = self.state / "values.yaml"
        pools = configured_pools() if os.environ.get("FLOTILLA_CLUSTER_POOLS") else None
        values.write_text(yaml.safe_dump(self.values(imgs, pools)))
        run(str(bindir / "helm"), "upgrade", "--install", RELEASE, str(REPO / "charts/flotilla"),
            "--namespace", NAMESPACE, "--create-namespace", "--values", str(values),
            env=self.helm_env())
        self.wait_chart_ready()

    def wait_chart_ready(self, timeout: float | None = None) -> None:
        """Wait for the chart's pods ($FLOTILLA_CLUSTER_READY_TIMEOUT seconds, default
        300: a TCG guest starts them several times slower)."""
        if timeout is None:
            timeout = float(os.environ.get("FLOTILLA_CLUSTER_READY_TIMEOUT", "300"))
        kube = self.kube()
        apps = f"/apis/apps/v1/namespaces/{NAMESPACE}"

        def ready() -> bool:
            dep = kube.request("GET", f"{apps}/deployments/{RELEASE}-controller")
            ds = kube.request("GET", f"{apps}/daemonsets/{RELEASE}-node")
            want = dep["spec"]["replicas"]
            return bool(dep["status"].get("readyReplicas", 0) == want
                        and dep["status"].get("updatedReplicas", 0) == want
                        and ds["status"].get("desiredNumberScheduled", 0) > 0
                        and ds["status"].get("numberReady", 0)
                        == ds["status"]["desiredNumberScheduled"]
                        and ds["status"].get("updatedNumberScheduled", 0)
                        == ds["status"]["desiredNumberScheduled"])
        try:
            self.wait("the controller Deployment and node DaemonSet to be Ready", ready,
                      timeout=timeout, procs=("kubelet", "containerd", "kube-apiserver"))
        except RuntimeError:
            log(self.describe_pods())
            raise

    def describe_pods(self) -> str:
        """Every pod with its phase and each container's state (for failures)."""
        lines = []
        with contextlib.suppress(ApiError, OSError, KeyError):
            for pod in self.kube().request("GET", "/api/v1/pods")["items"]:
                meta, status = pod["metadata"], pod.get("status", {})
                lines.append(f"{meta['namespace']}/{meta['name']}: {status.get('phase')}")
                for cs in status.get("containerStatuses", []):
                    lines.append(f"  {cs['name']}: ready={cs['ready']} "
                                 f"restarts={cs['restartCount']} {json.dumps(cs['state'])}")
        return "\n".join(lines)

    def save_logs(self) -> Path:
        """The processes' and pods' logs, copied out of what `down` removes."""
        keep = Path(os.environ.get("FLOTILLA_CLUSTER_LOGS", "/var/tmp/flotilla-cluster-logs"))
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for src, name in ((self.state / "logs", "processes"), (Path("/var/log/pods"), "pods")):
            if src.is_dir():
                shutil.copytree(src, keep / name, symlinks=False, dirs_exist_ok=True)
        (keep / "pods.txt").write_text(self.describe_pods() + "\n")
        return keep

    # ---- down -----------------------------------------------------------------------------

    def down(self, uninstall: bool = True) -> None:
        data = self.record()
        if not data:
            log("no cluster recorded")
            return
        running = self.running()
        if uninstall and {"kube-apiserver", "kubelet", "containerd"} <= set(running):
            with contextlib.suppress(Exception):
                self._remove_workloads()
        for name in reversed(ORDER):
            if name == "containerd":
                self._kill_pods()
            self.stop(name)
        self._kill_shims()
        self._cleanup(data)
        log("cluster down")

    def _remove_workloads(self) -> None:
        """Every namespace but the system ones goes (PVCs first, so the driver deletes the
        volumes), then the chart."""
        kube = self.kube()
        system = {"default", "kube-system", "kube-public", "kube-node-lease", NAMESPACE}
        namespaces = [n["metadata"]["name"] for n in kube.list("Namespace")
                      if n["metadata"]["name"] not in system]
        for ns in namespaces:
            kube.delete("Namespace", ns)
        self.wait("workload namespaces to go",
                  lambda: not any(n["metadata"]["name"] in namespaces
                                  for n in kube.list("Namespace")), timeout=240)
        self.wait("persistent volumes to go", lambda: not kube.list("PersistentVolume"),
                  timeout=120)
        run(str(tools_dir() / "helm"), "uninstall", RELEASE, "--namespace", NAMESPACE,
            "--wait", "--timeout", "180s", env=self.helm_env(), check=False)
        self.wait("the chart's pods to go", lambda: not kube.request(
            "GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"], timeout=180)

    def _cgroup_dirs(self) -> Iterator[Path]:
        """The kubelet's cgroups (kubepods) in every v1 hierarchy, deepest first."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            top = hierarchy / "kubepods"
            if top.is_dir():
                yield from sorted((p for p in top.rglob("*") if p.is_dir()),
                                  key=lambda p: -len(p.parts))
                yield top

    def _kill_pods(self) -> None:
        """What the kubelet left running (containers of pods not yet stopped): by PID,
        from the kubelet's own cgroups."""
        for _ in range(50):
            pids = set()
            for cg in self._cgroup_dirs():
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (cg / "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def _kill_shims(self) -> None:
        """containerd-shim processes of this containerd (their command line names its
        socket); by PID."""
        sock = str(self.state / "run" / "containerd.sock")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if sock.encode() in argv and b"shim" in argv[0]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(proc.name), signal.SIGKILL)

    def _cleanup(self, data: dict[str, Any]) -> None:
        # loops over files in the pools (raw block volumes, the pool's own image) first,
        # while their files can still be found: a mounted loop clears when unmounted
        for dev in self._new_loops(data):
            run("losetup", "--detach", dev, check=False)
        # mounts under our directories, deepest first (lazy where something holds them);
        # umount takes the topmost at a path, so one made over one from before goes first
        for point in sorted(self._new_mounts(data).elements(), key=lambda p: -len(p)):
            if run("umount", point, check=False).returncode != 0:
                run("umount", "-l", point, check=False)
        # the pods' network namespaces (containerd makes them in /run/netns)
        netns = Path("/run/netns")
        if netns.is_dir():
            for ns in netns.glob("cni-*"):
                if ns.stat().st_mtime >= data.get("t0", time.time()) - 5:
                    run("umount", str(ns), check=False)
                    with contextlib.suppress(OSError):
                        ns.unlink()
        for dev in self._new_loops(data):
            run("losetup", "--detach", dev, check=False)
        run("ip", "link", "delete", BRIDGE, check=False)
        for family in ("ip", "ip6"):
            run("nft", "delete", "table", family, "kube-proxy", check=False)
        for cg in self._cgroup_dirs():
            with contextlib.suppress(OSError):
                cg.rmdir()
        if "ip_forward" in data:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(data["ip_forward"] + "\n")
        for d, made in data.get("made", {}).items():
            if made and Path(d).exists() and not any(under(p, (Path(d),)) for p, _ in mounts()):
                shutil.rmtree(d, ignore_errors=True)
        if not any(under(p, (self.state,)) for p, _ in mounts()):
            shutil.rmtree(self.state, ignore_errors=True)

    def _new_mounts(self, data: dict[str, Any]) -> Counter[str]:
        """Mount points under our directories, less those there before `up`."""
        roots = (self.state, *FIXED_DIRS)
        now = Counter(p for p, _ in mounts() if under(p, roots))
        return now - Counter(data.get("before", {}).get("mounts", []))

    def _new_loops(self, data: dict[str, Any]) -> list[str]:
        before = set(data.get("before", {}).get("loops", []))
        return [d for d in loops_backed_under((self.state, *FIXED_DIRS)) if d not in before]

    def leftovers(self, data: dict[str, Any]) -> list[str]:
        """What a clean `down` must not leave behind (the tier asserts it is empty): `data`
        is the record of the `up` it follows."""
        found = [f"mount {p}" for p in self._new_mounts(data).elements()]
        found += [f"loop {dev}" for dev in self._new_loops(data)]
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            found.append(f"link {BRIDGE}")
        if run("nft", "list", "table", "ip", "kube-proxy", check=False).returncode == 0:
            found.append("nftables table ip kube-proxy")
        found += [f"cgroup {cg}" for cg in self._cgroup_dirs()]
        found += [f"process {n}" for n in self.running()]
        made = [Path(d) for d, m in data.get("made", {}).items() if m]
        found += [f"dir {d}" for d in (self.state, *made) if d.exists()]
        return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("up", "down", "status"))
    args = p.parse_args()
    cluster = Cluster()
    if args.action == "up":
        cluster.up()
    elif args.action == "down":
        data = cluster.record()
        cluster.down()
        left = cluster.leftovers(data)
        if left:
            log("left behind: " + ", ".join(left))
            return 1
    else:
        running = cluster.running()
        for name in ORDER:
            print(f"{name:24} {'pid ' + str(running[name]) if name in running else '-'}")
        if running:
            cluster.print_env()
    return 0


if __name__ == "__main__":
    sys.exit(main())
