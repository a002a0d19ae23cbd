"""CSI Identity service."""

from __future__ import annotations

import grpc

from csi import __version__
from csi._proto import csi_pb2, csi_pb2_grpc
from csi.errors import FlotillaError
from csi.pools import PoolSet

PluginCap = csi_pb2.PluginCapability


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, pools: PoolSet, controller: bool) -> None:
        self.driver_name = driver_name
        self.pools = pools
        self.controller = controller

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            PluginCap(volume_expansion=PluginCap.VolumeExpansion(
                type=PluginCap.VolumeExpansion.ONLINE)),
        ]
        if self.controller:
            caps += [
                PluginCap(service=PluginCap.Service(type=PluginCap.Service.CONTROLLER_SERVICE)),
                PluginCap(service=PluginCap.Service(
                    type=PluginCap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request: csi_pb2.ProbeRequest,
              context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        """Ready only when every pool can serve; the reason goes to the status details."""
        resp = csi_pb2.ProbeResponse()
        for pool in self.pools:
            try:
                pool.check()
            except FlotillaError as err:
                context.set_trailing_metadata((("flotilla-not-ready", str(err)),))
                resp.ready.value = False
                return resp
        resp.ready.value = True
        return resp
