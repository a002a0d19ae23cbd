"""Building the distributed modes: the controller's pool set, the node agent."""

from __future__ import annotations

from typing import Any

from csi.config import Config
from csi.errors import Unavailable
from csi.kube.api import ClientKubeApi, KubeApi, Obj
from csi.kube.placement import is_node_local
from csi.kube.pool import KubePool, KubeState
from csi.pools import PoolFailure, PoolListener, PoolSet, build_pool
from csi.system import System


def controller_pools(config: Config, system: System, state: KubeState,
                     instance: str = "", state_dir: str = "") -> PoolSet:
    """Node-local pools become KubePools; shared ones (nfs) are driven directly.

    Every pool is built from its configuration first, so options are validated the same
    way as on the nodes; node-local ones are never started in the controller.
    """
    pools = []
    for spec in config.pools:
        real = build_pool(spec, system, instance, state_dir)
        pools.append(KubePool(real, state) if is_node_local(real) else real)
    return PoolSet(pools)


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
