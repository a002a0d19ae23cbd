"""Flotilla: a Kubernetes CSI driver for thin-provisioned volumes."""

__version__ = "0.1.0"
DEFAULT_DRIVER_NAME = "flotilla.csi.io"
TOPOLOGY_KEY = "topology.flotilla.csi.io/node"
