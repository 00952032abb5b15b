"""Which users are assigned to which nodes: a node may read and commit the user/NAME/... layers of the
users assigned to it, and no others (coordinator/authz.py).

Kept in DATA/assignments.json ({"NODE": ["USER", ...]}), written whole by ``cachepoint-coordinator
assign``/``unassign`` (temporary file, fsync, rename) and read again by the serving coordinator when its
modification time changes. A file, not a column family: it is small (one line per node), an operator can
read it, and the CLI can change it while the coordinator runs without opening the store it holds.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol

from cachepoint.errors import InvalidInput
from cachepoint.trust.principal import check_name
from coordinator.history.users import validate_user

FILE = "assignments.json"


class AssignmentView(Protocol):
    """What authorization reads: these files, or with replicas the shared table's copy
    (coordinator/backends/trust_tables.py)."""

    def users_of(self, node: str) -> frozenset[str]: ...

    def assigned(self, node: str, user: str) -> bool:
        """Whether ``user`` is assigned to ``node`` now: the question a refusal rests on."""
        ...

    def all(self) -> dict[str, list[str]]: ...


class Assignments:
    def __init__(self, data: Path) -> None:
        self.path = data / FILE
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._by_node: dict[str, frozenset[str]] = {}

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> dict[str, frozenset[str]]:
        """The current assignments; re-read only when the file changed (a stat per call)."""
        with self._lock:
            stamp = self._stamp()
            if stamp != self._seen:
                by_node: dict[str, frozenset[str]] = {}
                if stamp is not None:
                    try:
                        raw = json.loads(self.path.read_text())
                    except (OSError, ValueError) as err:
                        raise InvalidInput(
                            f"{self.path}: not a JSON object of node -> users ({err})"
                        ) from err
                    if not isinstance(raw, dict):
                        raise InvalidInput(f"{self.path}: not a JSON object of node -> users")
                    by_node = {str(k): frozenset(str(u) for u in v) for k, v in raw.items()}
                self._by_node, self._seen = by_node, stamp
            return self._by_node

    def users_of(self, node: str) -> frozenset[str]:
        return self._load().get(node, frozenset())

    def assigned(self, node: str, user: str) -> bool:
        return user in self.users_of(node)  # the file is looked at again on every call already

    def all(self) -> dict[str, list[str]]:
        return {node: sorted(users) for node, users in sorted(self._load().items())}

    def _write(self, by_node: dict[str, frozenset[str]]) -> None:
        text = json.dumps({n: sorted(u) for n, u in sorted(by_node.items()) if u}, indent=1) + "\n"
        temp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        with open(temp, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, self.path)

    def assign(self, user: str, node: str) -> bool:
        """True when the assignment is new."""
        validate_user(user)
        check_name(node, "node name")
        by_node = dict(self._load())
        if user in by_node.get(node, frozenset()):
            return False
        by_node[node] = by_node.get(node, frozenset()) | {user}
        self._write(by_node)
        return True

    def unassign(self, user: str, node: str) -> bool:
        """True when there was such an assignment."""
        validate_user(user)
        check_name(node, "node name")
        by_node = dict(self._load())
        if user not in by_node.get(node, frozenset()):
            return False
        by_node[node] = by_node[node] - {user}
        self._write(by_node)
        return True
