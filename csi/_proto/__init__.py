"""Generated CSI v1.12.0 stubs (csi_pb2, csi_pb2_grpc), built from proto/csi.proto."""
