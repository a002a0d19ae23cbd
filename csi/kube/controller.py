"""The Controller service of ``--mode controller``: topology per volume and per segment.

The plain :class:`~csi.controller.ControllerService` serves one node (its own). Here
node-local pools are :class:`~csi.kube.pool.KubePool` s spanning the cluster, so:

* CreateVolume's accessibility requirements travel in the request to the pool
  (:attr:`~csi.pools.base.VolumeRequest.placement`: which node to write into the
  resource), which makes the node choice and its checks;
* a volume's accessible topology is the node it lives on (shared pools: no constraint);
* GetCapacity answers for the requested topology segment from what that node's agent
  published, so external-provisioner's ``--enable-capacity`` creates one
  CSIStorageCapacity per node and pool.
"""

from __future__ import annotations

import grpc

from csi import TOPOLOGY_KEY
from csi._proto import csi_pb2
from csi.controller import VOLUME_PARAMETERS as VOLUME_PARAMS
from csi.controller import ControllerService, check_pool_serves, split_parameters
from csi.errors import InvalidArgument
from csi.kube.pool import KubePool
from csi.pools import PoolDown
from csi.pools.base import Volume
from csi.validation import read_capabilities


class DistributedControllerService(ControllerService):
    def _check_topology(self, request: csi_pb2.CreateVolumeRequest) -> None:
        """Node choice and its checks belong to the pool (KubePool) here."""

    def _volume_msg(self, vol: Volume) -> csi_pb2.Volume:
        msg = super()._volume_msg(vol)
        del msg.accessible_topology[:]
        pool = self.pools.pools.get(vol.pool)
        if isinstance(pool, KubePool):
            node = pool.node_of(vol.id)
            if node:
                msg.accessible_topology.append(
                    csi_pb2.Topology(segments={TOPOLOGY_KEY: node}))
        return msg

    def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                    context: grpc.ServicerContext) -> csi_pb2.GetCapacityResponse:
        params = split_parameters(dict(request.parameters), VOLUME_PARAMS)
        try:
            pool = self.pools.named(params.get("pool"))
        except PoolDown:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        if not isinstance(pool, KubePool):
            return super().GetCapacity(request, context)
        if request.volume_capabilities:
            try:
                check_pool_serves(pool, read_capabilities(request.volume_capabilities))
            except InvalidArgument:
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        node = (request.accessible_topology.segments.get(TOPOLOGY_KEY)
                if request.HasField("accessible_topology") else None)
        cap = pool.capacity_on(node) if node else pool.capacity()
        resp = csi_pb2.GetCapacityResponse(available_capacity=cap.available if cap else 0)
        if cap is not None:
            resp.maximum_volume_size.value = cap.available
            resp.minimum_volume_size.value = pool.granularity
        return resp
