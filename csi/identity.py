"""CSI Identity service."""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

from csi import __version__
from csi._proto import csi_pb2, csi_pb2_grpc
from csi.pools import PoolSet

PluginCap = csi_pb2.PluginCapability


#: GetPluginInfo manifest key of each pool's state: ``pool.<name>`` ->
#: ``<type> serving`` or ``<type> failed: <start error>`` (read by ``flotillactl pools``)
MANIFEST_POOL_PREFIX = "pool."


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, pools: PoolSet, controller: bool) -> None:
        self.driver_name = driver_name
        self.pools = pools
        self.controller = controller

    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        """Name and version; the manifest says which pools serve and why others do not
        (from memory: no pool I/O)."""
        manifest = {}
        failures = self.pools.failures()
        for pool in self.pools.all():
            failure = failures.get(pool.name)
            manifest[MANIFEST_POOL_PREFIX + pool.name] = (
                f"{pool.type} serving" if failure is None else
                f"{pool.type} failed: {failure.error} (attempt {failure.attempts}, next in "
                f"{failure.next_retry():.0f}s)")
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__,
                                             manifest=manifest)

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
        """Process health only: ready once the process serves, which it does only after
        every pool's start was attempted, healthy or not.

        Storage health is not Probe's to report: the livenessprobe sidecar turns
        ready=false into HTTP 500 and the kubelet restarts the plugin, exactly when an
        admin needs DeleteVolume to free a full pool or the NFS server is down. It is
        reported by the ``flotilla_pool_up`` / ``flotilla_pool_started`` metrics, the
        volume conditions of ListVolumes / ControllerGetVolume / NodeGetVolumeStats, the
        FlotillaNode status and ``flotillactl pools``. No pool I/O here: Probe is fast.
        """
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
