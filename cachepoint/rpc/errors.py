"""One table maps our errors to gRPC status codes; servicers never choose codes ad hoc.

| error | status |
|---|---|
| AlreadyExists (a legal hold on a user already held) | ALREADY_EXISTS |
| InvalidInput, ValueError (malformed names, refs, ids, manifests) | INVALID_ARGUMENT |
| NotFound (layer, version, tag, manifest, block) | NOT_FOUND |
| MissingBlocks (a commit naming blocks the node lacks), PreconditionFailed | FAILED_PRECONDITION |
| NotAnOrigin (pushing to a node that does not take pushes) | PERMISSION_DENIED |
| OutOfSpace (with the trailer OUT_OF_SPACE_TRAILER), TooManyStreams (a peer or the node at its limit
of streams) | RESOURCE_EXHAUSTED |
| PeerStalled (a caller that read nothing of a stream for its stall time) | DEADLINE_EXCEEDED |
| BlockCorrupt, BlockUnreadable, IntegrityFailure (e.g. an unreadable audit record) | DATA_LOSS |
| CatalogUnreadable (a GC that cannot prove it read the catalog), RecordsUnreadable, StoreDamaged |
DATA_LOSS |
| StoreBusy | UNAVAILABLE |
| anything else | INTERNAL (logged with its traceback) |

Every other status is logged in one line without a traceback: the codes of a caller's mistake
(CLIENT_CODES: bad input, not found, not allowed) at INFO, the rest (damage, busy) at WARNING.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from cachepoint.errors import (
    AlreadyExists,
    BlockCorrupt,
    BlockUnreadable,
    CachepointError,
    CatalogUnreadable,
    IntegrityFailure,
    InvalidInput,
    NotFound,
    OutOfSpace,
    RecordsUnreadable,
    StoreBusy,
    StoreDamaged,
)
from cachepoint.logs import refused
from cachepoint.slots import TooManyStreams

log = logging.getLogger("cachepoint.rpc")

# RESOURCE_EXHAUSTED means both "no disk space" and "too many streams"; this trailer tells the caller
# which, so its command exits 7 (out of space) and not 10 (refused). See cachepoint/rpc/client.py.
OUT_OF_SPACE_TRAILER = ("cachepoint-error", "out-of-space")


class MissingBlocks(CachepointError):
    """{} of the blocks named by the manifest are not here (first: {}); push them first"""


class PreconditionFailed(CachepointError):
    """{}"""


class NotAnOrigin(CachepointError):
    """this node serves blocks but does not take pushes; push to the coordinator"""


class PeerStalled(CachepointError):
    """{}: the caller read nothing for {:g} s; the stream is ended"""


STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (MissingBlocks, grpc.StatusCode.FAILED_PRECONDITION),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (NotAnOrigin, grpc.StatusCode.PERMISSION_DENIED),
    (OutOfSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PeerStalled, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BlockCorrupt, grpc.StatusCode.DATA_LOSS),
    (BlockUnreadable, grpc.StatusCode.DATA_LOSS),
    (IntegrityFailure, grpc.StatusCode.DATA_LOSS),
    (CatalogUnreadable, grpc.StatusCode.DATA_LOSS),
    (RecordsUnreadable, grpc.StatusCode.DATA_LOSS),
    (StoreDamaged, grpc.StatusCode.DATA_LOSS),
    (StoreBusy, grpc.StatusCode.UNAVAILABLE),
]


CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def status_for(err: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_TABLE:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, err: BaseException, name: str) -> None:
    code = status_for(err)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name)
    else:
        level = logging.INFO if code in CLIENT_CODES else logging.WARNING
        message = f"{name} from {context.peer()}: {code.name}: {err}"
        refused(log, level, message, code=code.name, method=name, peer=context.peer())
    trailer = (OUT_OF_SPACE_TRAILER,) if isinstance(err, OutOfSpace) else ()
    await context.abort(code, str(err) or type(err).__name__, trailing_metadata=trailer)


def rpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a grpc.aio servicer method (coroutine or async generator) with the status table."""
    name = method.__qualname__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as err:
                await _abort(context, err, name)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort(context, err, name)

    return unary
