"""Which backend a coordinator runs on, from its config: embedded (``data`` only, the default) or
shared (``catalog = "postgresql://..."`` and ``blocks = "file:///..."``, several replicas at once)."""

from __future__ import annotations

import logging
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cachepoint.errors import InvalidInput
from cachepoint.store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Backend:
    data: Path
    catalog: str = ""  # postgresql://… (empty: the embedded store in data)
    blocks: str = ""  # file:///… (required with a catalog)
    block_grace_s: float = 3600.0

    @property
    def shared(self) -> bool:
        return bool(self.catalog)

    def check(self) -> None:
        if self.catalog and not self.catalog.startswith(("postgresql://", "postgres://")):
            raise InvalidInput(f"catalog = {self.catalog!r}: write a postgresql:// connection string")
        if self.catalog and not self.blocks:
            raise InvalidInput(
                "catalog is PostgreSQL: say where the replicas share their blocks, "
                'blocks = "file:///DIR" (a directory every replica mounts)'
            )
        if self.blocks and not self.catalog:
            raise InvalidInput('blocks = "file:///..." goes with catalog = "postgresql://..." (replicas)')
        if self.blocks:
            from coordinator.backends.fileblocks import blocks_root

            blocks_root(self.blocks)
        if self.block_grace_s < 0:
            raise InvalidInput("block_grace: not negative")

    def open(self) -> Store:
        """The coordinator's store (writable; created when missing)."""
        self.check()
        if not self.shared:
            from coordinator.backends.migrated import refuse_embedded

            refuse_embedded(self.data)  # its state lives in a catalog now (`migrate`)
            return Store.open(self.data, writable=True, create=True)
        from coordinator.backends.fileblocks import FileBlocks, blocks_root
        from coordinator.backends.records import PgStoreDB

        db = PgStoreDB(self.catalog, self.data)
        try:
            return Store(db, FileBlocks(blocks_root(self.blocks), self.block_grace_s))  # type: ignore[arg-type]
        except BaseException:
            db.close()
            raise


def replica_name(listen: str) -> str:
    """Who holds a lease: this host and listener, and a random part (two starts are two holders)."""
    return f"{socket.gethostname()}/{listen}/{secrets.token_hex(3)}"
