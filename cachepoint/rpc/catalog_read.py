"""The read side of Catalog over a local store. Every node serves it, so a cachepoint can pull from a
peer (or a laptop from a desk-side box) without the coordinator; the coordinator adds the writes.

With mutual TLS, ``reader`` says which layers the call's principal may read (cachepoint/trust/
reading.py): ListLayers names only those, and GetManifest answers only for a manifest some version of
those references; for any other digest it fails exactly as for a digest that is not here. (Resolve
and ListVersions name their layer: the server's authorizer refuses them before they get here.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from cachepoint.errors import RefNotFound
from cachepoint.ids import DIGEST_SIZE, validate_layer_name
from cachepoint.rpc.errors import rpc_errors
from cachepoint.store.catalog import Catalog
from cachepoint.store.store import Store
from cachepoint.v1 import catalog_pb2, catalog_pb2_grpc, version_pb2
from cachepoint.wire import ref_from_pb, version_to_pb

# The layers a call may read, None for all (no TLS).
LayerReader = Callable[[grpc.aio.ServicerContext], Callable[[str], bool] | None]


def everything(context: grpc.aio.ServicerContext) -> Callable[[str], bool] | None:
    return None


def manifest_readable(catalog: Catalog, digest: bytes, may_read: Callable[[str], bool]) -> bool:
    """Whether a version of a layer ``may_read`` allows references manifest ``digest``. It reads the
    version records of those layers (one scan, O(versions); GetManifest comes once per pull)."""
    return any(
        v.manifest_digest == digest
        for layer in catalog.layers()
        if may_read(layer.name)
        for v in catalog.versions(layer.name)
    )


class CatalogReadService(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, store: Store, reader: LayerReader = everything) -> None:
        self.store = store
        self.reader = reader

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
        may_read = self.reader(context)

        def collect() -> catalog_pb2.ListLayersResponse:
            response = catalog_pb2.ListLayersResponse()
            for layer in self.store.catalog.layers():
                if may_read is not None and not may_read(layer.name):
                    continue
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
        may_read = self.reader(context)

        def read() -> bytes:
            if may_read is not None and not manifest_readable(self.store.catalog, request.digest, may_read):
                # The very error of a digest not in the store: the caller cannot tell the two apart.
                raise RefNotFound(f"manifest {request.digest.hex()[:12]}", "it is not in this store")
            return self.store.catalog.manifest_bytes(request.digest)

        raw = await asyncio.to_thread(read)
        return catalog_pb2.ManifestBlob(digest=request.digest, manifest=raw)
