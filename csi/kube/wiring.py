"""Building the distributed modes: the controller's pool set, the node agent."""

from __future__ import annotations

from typing import Any

from csi.config import Config
from csi.errors import Unavailable
from csi.kube.api import ClientKubeApi, KubeApi
from csi.kube.placement import is_node_local
from csi.kube.pool import KubePool, KubeState
from csi.pools import PoolSet, build_pool
from csi.system import System


def controller_pools(config: Config, system: System, state: KubeState) -> PoolSet:
    """Node-local pools become KubePools; shared ones (nfs) are driven directly.

    Every pool is built from its configuration first, so options are validated the same
    way as on the nodes; node-local ones are never started in the controller.
    """
    pools = []
    for spec in config.pools:
        real = build_pool(spec, system)
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
