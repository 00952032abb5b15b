"""Which blocks a BlockExchange caller is answered about: with mutual TLS, only blocks that the version
it names (FetchBlocksRequest.version, HasBlocksRequest.version) references, and only when it may read
that version. Any other id is answered as "missing", exactly like a block that is not here, so no
caller learns whether a block of a version it may not read exists (no dedup oracle).

The block set of each version is cached (a manifest is read and decoded once, not per call), bounded
by the number of ids held: a version of 10 GiB in 64 KiB blocks is 160k ids, some 15 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import grpc

from cachepoint.errors import CachepointError
from cachepoint.ids import Ref
from cachepoint.store.store import Store
from cachepoint.trust.principal import NotAPrincipal, principal_of_pem
from cachepoint.trust.reading import UsersOf, may_read_layer

CACHED_IDS = 2_000_000  # ids kept in the cache at most, over all versions
NOTHING: frozenset[bytes] = frozenset()

# (caller, layer) -> whether the caller may read the layer; the caller None: no TLS, everything answers.
Reader = Callable[[str], bool]


class VersionBlocks:
    def __init__(self, store: Store, cached_ids: int = CACHED_IDS) -> None:
        self.store = store
        self.cached_ids = cached_ids
        self._lock = threading.Lock()
        self._sets: OrderedDict[tuple[str, int], frozenset[bytes]] = OrderedDict()
        self._held = 0
        # Versions this node is pulling now, not yet in its catalog: its site peers pulling them too
        # ask it for its share of their blocks (docs/design.md "Site fan-out").
        self._pulling: dict[tuple[str, int], frozenset[bytes]] = {}

    def pulling(self, layer: str, number: int, ids: frozenset[bytes] | None) -> None:
        """Answer for ``layer@number``'s ``ids`` while it is being pulled here; None: no longer."""
        with self._lock:
            if ids is None:
                self._pulling.pop((layer, number), None)
            else:
                self._pulling[(layer, number)] = ids

    def readable(self, version: str, may_read: Reader) -> frozenset[bytes]:
        """The ids of ``version`` ("LAYER@N" or "LAYER:TAG") when ``may_read`` allows its layer; else
        none. A malformed or unknown version is none too: the answer does not say which."""
        try:
            ref = Ref.parse(version)
        except (CachepointError, ValueError):
            return NOTHING
        if not may_read(ref.layer):
            return NOTHING
        with self._lock:
            pulling = self._pulling.get((ref.layer, ref.number)) if ref.number is not None else None
        if pulling is not None:
            return pulling
        try:
            info = self.store.catalog.resolve(ref)
        except CachepointError:
            return NOTHING
        key = (info.layer, info.number)
        with self._lock:
            known = self._sets.get(key)
            if known is not None:
                self._sets.move_to_end(key)
                return known
        try:
            ids = frozenset(self.store.catalog.manifest(info.manifest_digest).block_ids())
        except CachepointError:
            return NOTHING
        with self._lock:
            if key not in self._sets:
                self._sets[key] = ids
                self._held += len(ids)
                while self._held > self.cached_ids and len(self._sets) > 1:
                    _, dropped = self._sets.popitem(last=False)
                    self._held -= len(dropped)
        return ids


def peer_answers(
    blocks: VersionBlocks, users_of: UsersOf
) -> Callable[[grpc.aio.ServicerContext, str], frozenset[bytes] | None]:
    """BlockExchange's filter at a node's peer port, with the layer rule of cachepoint/trust/reading.py
    and the assignments of the node's fleet view; without TLS (no client certificate), every block."""

    def answerable(context: grpc.aio.ServicerContext, version: str) -> frozenset[bytes] | None:
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None
        try:
            principal = principal_of_pem(pems[0])
        except (NotAPrincipal, ValueError):
            return NOTHING
        return blocks.readable(version, lambda layer: may_read_layer(principal, layer, users_of))

    return answerable
