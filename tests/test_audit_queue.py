"""The coordinator drains the records that data-directory commands queue for its audit log
(coordinator/pki/audit_queue.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachepoint.atomic import TEMP_PREFIX
from coordinator.history.audit import AuditLog
from coordinator.pki import audit_queue
from tests.fleet import open_coordinator_store

pytestmark = pytest.mark.coordinator_backends  # every test runs on both backends (tests/conftest.py)


def test_a_record_still_being_written_is_left_for_the_next_drain(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    data.mkdir()
    done = audit_queue.queue(data, audit_queue.ASSIGNED, "user/alice", {"node": "blade-1"})
    # What write_file holds before its rename: the whole record under a temporary name that also ends
    # in .json. Taken and removed there, the rename fails and the command with it.
    writing = done.parent / f"{TEMP_PREFIX}0123456789abcdef.{done.name}"
    writing.write_bytes(done.read_bytes())
    with open_coordinator_store(data) as store:
        log = AuditLog(store.db)
        assert audit_queue.drain(data, log) == 1
        assert log.head()[0] == 1
    assert not done.exists()
    assert writing.exists(), "a file being written was taken (and removed) by the drain"
