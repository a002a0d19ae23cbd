"""How one driver process is put together, for each ``--mode``, in one place: the pools
(real ones, wrapped with backups when targets are configured, or the controller's
KubePools), the backup manager, the Kubernetes state, the node agent, and the CSI
services that serve. :mod:`csi.server` parses flags, logs, intercepts calls and runs
what this module builds.

=================  =======================================  ==========================
mode               pools                                    services
=================  =======================================  ==========================
``all``            every pool, driven here (+ backups)      Identity, Controller, Node
``controller``     node-local ones as KubePools (the        Identity, Controller
                   node agents drive them); shared ones     (per-node topology and
                   (nfs) driven here (+ backups)            capacity)
``node``           every pool, driven here (+ backups);     Identity, Node
                   the NodeAgent drives the node-local
                   ones from custom resources
=================  =======================================  ==========================
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import grpc

from csi._proto import csi_pb2_grpc
from csi.backup.manager import BackupManager
from csi.backup.pool import with_backups
from csi.backup.targets import build_targets
from csi.config import Config
from csi.controller import ControllerService
from csi.errors import Unavailable
from csi.identity import IdentityService
from csi.kube.agent import NodeAgent
from csi.kube.api import ClientKubeApi, KubeApi, Obj
from csi.kube.controller import DistributedControllerService
from csi.kube.pool import KubePool, KubeState
from csi.locks import KeyedTryLock
from csi.metrics import Metrics
from csi.node import NodeService
from csi.pools import PoolFailure, PoolListener, PoolSet, build_pool
from csi.system import System


@dataclass
class Parts:
    """What :func:`build` made for one process."""

    pools: PoolSet
    metrics: Metrics
    backups: BackupManager | None
    kube_state: KubeState | None  # the controller's informers (--mode controller)


def build(args: argparse.Namespace, config: Config, system: System) -> Parts:
    """Pools, metrics, backups and Kubernetes state of a process; nothing started."""
    #: who this process is among those sharing a pool's storage (e.g. the replicas and
    #: node plugins on one NFS export): node id and mode
    instance = f"{args.node_id}-{args.mode}"
    metrics = Metrics(args.driver_name)
    backups = None
    if config.backup_targets:
        backups = BackupManager(build_targets(config.backup_targets), args.state_dir,
                                args.node_id, metrics.registry)
    kube_state = None
    if args.mode == "controller":
        kube_state = KubeState(make_api(args, "controller"), args.kube_timeout,
                               args.capacity_interval)
        pools = controller_pools(config, system, kube_state, instance, args.state_dir,
                                 backups)
        pools.watch(node_events(kube_state.api, args.node_id))
    else:
        pools = PoolSet([with_backups(build_pool(spec, system, instance, args.state_dir),
                                      backups) for spec in config.pools])
    metrics.add_pools(pools)
    return Parts(pools=pools, metrics=metrics, backups=backups, kube_state=kube_state)


def controller_pools(config: Config, system: System, state: KubeState,
                     instance: str = "", state_dir: str = "",
                     backups: BackupManager | None = None) -> PoolSet:
    """Node-local pools become KubePools; shared ones (nfs) are driven directly.

    Every pool is built from its configuration first, so options are validated the same
    way as on the nodes; node-local ones are never started in the controller.
    """
    pools = []
    for spec in config.pools:
        real = build_pool(spec, system, instance, state_dir)
        pools.append(KubePool(real, state, backups) if real.node_local
                     else with_backups(real, backups))
    return PoolSet(pools)


def node_agent(args: argparse.Namespace, parts: Parts, locks: KeyedTryLock) -> NodeAgent:
    """The node plugin's agent; finished backups wake it for their snapshots."""
    agent = NodeAgent(make_api(args, "node"), parts.pools, args.node_id, locks,
                      args.capacity_interval)
    if parts.backups is not None:
        parts.backups.on_done = agent.backup_done
    return agent


def add_services(server: grpc.Server, args: argparse.Namespace, config: Config,
                 parts: Parts, system: System, locks: KeyedTryLock) -> None:
    """The CSI services of the mode (see the table in the module docstring)."""
    mode = args.mode
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityService(args.driver_name, parts.pools, mode != "node"), server)
    if mode in ("all", "controller"):
        service = DistributedControllerService if mode == "controller" else ControllerService
        csi_pb2_grpc.add_ControllerServicer_to_server(
            service(parts.pools, args.node_id, locks, parts.backups), server)
    if mode in ("all", "node"):
        configured = [*config.allowed_roots, os.path.abspath(args.state_dir)]
        # each root as configured and as its real path (kubelet names paths by the
        # configured spelling; links below a root are refused, never followed)
        roots = list(dict.fromkeys(r for root in configured
                                   for r in (root, os.path.realpath(root))))
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(parts.pools, system, args.node_id, locks, roots,
                        config.max_volumes_per_node), server)


def make_api(args: Any, component: str) -> KubeApi:
    """The API client of a distributed mode; a missing configuration is a clear error."""
    try:
        return ClientKubeApi(kubeconfig=args.kubeconfig, component=component,
                             host=args.node_id)
    except Exception as err:  # ConfigException, OSError, a malformed kubeconfig
        raise Unavailable(
            f"--mode {args.mode} needs the Kubernetes API: no in-cluster service account "
            f"and no usable kubeconfig ({args.kubeconfig or '$KUBECONFIG or ~/.kube/config'}"
            f"): {err}") from None


def node_events(api: KubeApi, node_id: str) -> PoolListener:
    """Events on the Kubernetes Node ``node_id`` for the start attempts of the pools this
    process drives itself (the controller's shared pools; a node plugin reports on its
    FlotillaNode instead). The reference is the kubelet's (uid = node name), which
    ``kubectl describe node`` shows."""
    ref: Obj = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node_id, "uid": node_id}}

    def on_change(pool: str, failure: PoolFailure | None) -> None:
        if failure is None:
            api.event(ref, "PoolStarted", f"flotilla pool {pool!r} started; serving it")
        else:
            api.event(ref, "PoolStartFailed",
                      f"flotilla pool {pool!r} cannot start (attempt {failure.attempts}, "
                      f"next in {failure.retry_in:.0f}s): {failure.error}", warning=True)

    return on_change
