"""The note `migrate` leaves in a data directory whose embedded store it copied to a shared backend
(DATA/migrated.json): where the state went, so that nothing serves the embedded store again. The store
in DATA/db stays as it was before the migration (a fallback an operator may keep or remove); serving it
after replicas have written to the catalog would make a second, diverging coordinator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cachepoint.atomic import sync_directory
from cachepoint.errors import InvalidInput

FILE = "migrated.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Migrated:
    catalog: str  # the database, without its password
    blocks: str  # file:///… as given
    store_id: str  # hex: the coordinator's identity, the same on both sides
    at: str  # ISO time the copy verified

    def as_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "catalog": self.catalog,
            "blocks": self.blocks,
            "store_id": self.store_id,
            "at": self.at,
        }


class EmbeddedStoreMigrated(InvalidInput):
    """{} was migrated to {} ({}): serve it with --catalog {} --blocks {} (its db/ holds the state
    from before the migration and is not served again; remove {} only to go back to it on purpose)"""


def read(data: Path) -> Migrated | None:
    path = data / FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InvalidInput(f"{path}: not the note of a migration ({err})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidInput(f"{path}: not the note of a migration of format {FORMAT}")
    return Migrated(str(raw["catalog"]), str(raw["blocks"]), str(raw["store_id"]), str(raw["at"]))


def write(data: Path, note: Migrated) -> None:
    """Temporary file, fsync, rename, directory fsync: the note is there whole or not at all."""
    path = data / FILE
    temp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    with open(temp, "w") as out:
        out.write(json.dumps(note.as_json(), indent=1) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    sync_directory(data)


def refuse_embedded(data: Path) -> None:
    """Before the embedded store in ``data`` is served: refused once it was migrated."""
    note = read(data)
    if note is not None:
        raise EmbeddedStoreMigrated(data, note.catalog, note.at, note.catalog, note.blocks, data / FILE)
