"""Distributed mode: the controller and the node agents meet in custom resources.

``flotilla --mode controller`` (the Deployment) cannot touch node disks. For every
node-local pool it holds a :class:`csi.kube.pool.KubePool`, which writes intent into
cluster-scoped custom resources (``FlotillaVolume``, ``FlotillaSnapshot``: spec = name,
node, pool, size, source) and waits, bounded, for their status. ``flotilla --mode node``
(the DaemonSet) runs :class:`csi.kube.agent.NodeAgent`, which watches the resources
labelled with its node, makes them so through the real pool, writes status and events,
and publishes each pool's capacity in a ``FlotillaNode`` resource, from which
``GetCapacity`` answers per topology segment. Shared pools (those whose type does not
declare :attr:`~csi.pools.base.Pool.node_local`, e.g. nfs) are driven by the controller
directly.

Module map::

    api.py        the small API surface used (custom objects, events) + its client impl
    informer.py   list + watch cache of one resource type, with waiters
    resources.py  CR names, labels, spec/status <-> pool dataclasses, error round-trip
    pool.py       KubePool: the controller's stand-in for a node-local pool
    agent.py      NodeAgent: reconciles the node's resources through the real pools
    controller.py ControllerService with per-volume topology and per-segment capacity

(csi/wiring.py builds these for ``--mode controller`` and ``--mode node``.)
"""

GROUP = "flotilla.csi.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

VOLUMES = "flotillavolumes"
SNAPSHOTS = "flotillasnapshots"
NODES = "flotillanodes"
KIND_OF = {VOLUMES: "FlotillaVolume", SNAPSHOTS: "FlotillaSnapshot", NODES: "FlotillaNode"}

#: label on volumes and snapshots: the node whose agent owns them
NODE_LABEL = f"{GROUP}/node"
#: label: the pool
POOL_LABEL = f"{GROUP}/pool"
#: finalizer held until the node agent has removed the storage
FINALIZER = f"{GROUP}/storage"
#: namespace for Events about cluster-scoped resources
EVENT_NAMESPACE = "default"
