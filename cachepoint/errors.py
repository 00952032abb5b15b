"""Errors users can see. Each class's docstring is its message, formatted with its arguments
(as borg does), and each carries the process exit code the CLI returns for it.

Exit codes (documented in README.md, "Exit codes"):
  0 success · 1 unexpected failure · 2 usage error · 3 not found · 4 invalid input
  5 store busy (another writer holds it) · 6 incompatible store format · 7 out of space
  8 integrity problem found (fsck) · 9 a remote node (coordinator, peer, daemon) cannot be reached
  10 a remote node refused the request
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INVALID = 4
EXIT_BUSY = 5
EXIT_FORMAT = 6
EXIT_NO_SPACE = 7
EXIT_CORRUPT = 8
EXIT_UNREACHABLE = 9
EXIT_REMOTE = 10


class CachepointError(Exception):
    """{}"""

    exit_code = EXIT_FAILURE

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.args = args

    def __str__(self) -> str:
        doc = type(self).__doc__ or "{}"
        # A docstring may wrap over lines: its whitespace folds to single spaces (the arguments keep theirs).
        return " ".join(doc.split()).format(*self.args)


class InvalidInput(CachepointError):
    """{}"""

    exit_code = EXIT_INVALID


class InvalidLayerName(InvalidInput):
    """invalid layer name {!r}: {}"""


class InvalidRef(InvalidInput):
    """invalid ref {!r}: {} (expected LAYER, LAYER@N or LAYER:TAG)"""


class InvalidTag(InvalidInput):
    """invalid tag {!r}: {}"""


class InvalidBlockSize(InvalidInput):
    """invalid block size {!r}: {}"""


class SourceUnreadable(InvalidInput):
    """cannot read {!r}: {}"""


class UnsafePath(InvalidInput):
    """refusing to write {!r} under {}: {}"""


class AlreadyExists(InvalidInput):
    """{}"""


class PlaintextNbdOffLoopback(InvalidInput):
    """refusing to serve NBD on {} without TLS: {}"""


class NotFound(CachepointError):
    """{}"""

    exit_code = EXIT_NOT_FOUND


class LayerNotFound(NotFound):
    """layer {!r} does not exist in this store"""


class RefNotFound(NotFound):
    """{} does not exist: {}"""


class ImageNotFound(NotFound):
    """image {!r} does not exist in this store"""


class StoreBusy(CachepointError):
    """store {} is open for writing by another process (a running daemon or another command): {}"""

    exit_code = EXIT_BUSY


class StoreMissing(NotFound):
    """no store at {} (create one with `cachepoint init` or by ingesting into it)"""


class IncompatibleFormat(CachepointError):
    """store {} has format version {}, this cachepoint supports {}: {}"""

    exit_code = EXIT_FORMAT


class OutOfSpace(CachepointError):
    """out of disk space while writing to store {}: {} (nothing was committed; free space and retry)"""

    exit_code = EXIT_NO_SPACE


class DestinationFull(CachepointError):
    """out of space while writing {}: {} (nothing was left behind; free space and retry)"""

    exit_code = EXIT_NO_SPACE


class PullsPaused(OutOfSpace):
    """pulls paused: {} free, at min_free {} ({}) on store {}; they resume when space returns"""


class BlockCorrupt(CachepointError):
    """block {} is corrupt: its bytes hash to {}"""

    exit_code = EXIT_CORRUPT


class BlockOversized(BlockCorrupt):
    """block {} is refused: {}"""


class BlockUnreadable(CachepointError):
    """block {} cannot be read from the store: {} (run `cachepoint fsck` to see which versions it touches)"""

    exit_code = EXIT_CORRUPT


class BlockMissing(NotFound):
    """block {} is not in this store"""


class Unreachable(CachepointError):
    """cannot reach {} ({}): {}"""

    exit_code = EXIT_UNREACHABLE


class RemoteRefused(CachepointError):
    """{} refused the request ({}): {}"""

    exit_code = EXIT_REMOTE


class RemoteOutOfSpace(CachepointError):
    """{} refused the request for lack of disk space ({}): {}"""

    exit_code = EXIT_NO_SPACE


class IntegrityFailure(CachepointError):
    """{}"""

    exit_code = EXIT_CORRUPT


class PullIncomplete(CachepointError):
    """pull of {} stopped with {} blocks still missing: {}"""

    exit_code = EXIT_UNREACHABLE


class StoreDamaged(CachepointError):
    """store {} is damaged: {} (run `cachepoint repair` to salvage it; read-only commands still work)"""

    exit_code = EXIT_CORRUPT


class CatalogUnreadable(CachepointError):
    """{} refused: it could not prove it read the whole catalog of {}: {} (nothing was deleted; run
    `cachepoint fsck`, then `cachepoint repair`)"""

    exit_code = EXIT_CORRUPT


class RecordsUnreadable(CachepointError):
    """the {} records of store {} cannot be read: {}"""

    exit_code = EXIT_CORRUPT
