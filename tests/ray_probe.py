"""Ask a Ray cluster's GCS one question over gRPC, as any client that can reach its port could."""

from __future__ import annotations

import grpc
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc


def gcs_answer(address: str, token: str | None = None) -> str:
    """'OK' if the GCS at `address` tells its cluster id, else the gRPC status (UNAUTHENTICATED: refused)."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"
