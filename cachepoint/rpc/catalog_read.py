"""The read side of Catalog over a local store. Every node serves it, so a cachepoint can pull from a
peer (or a laptop from a desk-side box) without the coordinator; the coordinator adds the writes."""

from __future__ import annotations

import asyncio

import grpc

from cachepoint.ids import DIGEST_SIZE, validate_layer_name
from cachepoint.rpc.errors import rpc_errors
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from cachepoint.wire import ref_from_pb, version_to_pb


class CatalogReadService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @rpc_errors
    async def Resolve(  # noqa: N802 - gRPC method name
        self, request: catalog_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> version_pb2.VersionInfo:
        ref = ref_from_pb(request.ref)
        info = await asyncio.to_thread(self.store.catalog.resolve, ref)
        return version_to_pb(info)

    @rpc_errors
    async def ListLayers(  # noqa: N802
        self, request: catalog_pb2.ListLayersRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ListLayersResponse:
        def collect() -> catalog_pb2.ListLayersResponse:
            response = catalog_pb2.ListLayersResponse()
            for layer in self.store.catalog.layers():
                summary = response.layers.add(name=layer.name, kind=int(layer.kind), latest=layer.latest)
                summary.tags.update(self.store.catalog.tags(layer.name))
            return response

        return await asyncio.to_thread(collect)

    @rpc_errors
    async def ListVersions(  # noqa: N802
        self, request: catalog_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ListVersionsResponse:
        validate_layer_name(request.layer)
        versions = await asyncio.to_thread(self.store.catalog.versions, request.layer)
        return catalog_pb2.ListVersionsResponse(versions=[version_to_pb(v) for v in versions])

    @rpc_errors
    async def GetManifest(  # noqa: N802
        self, request: catalog_pb2.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> catalog_pb2.ManifestBlob:
        if len(request.digest) != DIGEST_SIZE:
            raise ValueError(f"a manifest digest has {DIGEST_SIZE} bytes, got {len(request.digest)}")
        raw = await asyncio.to_thread(self.store.catalog.manifest_bytes, request.digest)
        return catalog_pb2.ManifestBlob(digest=request.digest, manifest=raw)
