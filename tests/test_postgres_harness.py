"""The PostgreSQL harness (tests/postgres.py, fixtures in tests/conftest.py): a real server whose
per-test databases take tables, carry LISTEN/NOTIFY, and are new and empty for every test."""

from __future__ import annotations

import psycopg
import pytest

_databases_seen: list[str] = []


def test_a_test_database_takes_tables_and_carries_notifications_between_connections(
    postgres_dsn: str,
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as listener, psycopg.connect(postgres_dsn) as writer:
        writer.execute("CREATE TABLE versions (name text PRIMARY KEY, layers int NOT NULL)")
        writer.execute("INSERT INTO versions VALUES ('base', 3)")
        listener.execute("LISTEN versions_changed")
        writer.execute("SELECT pg_notify('versions_changed', 'base')")
        writer.commit()  # notifications are delivered at commit

        heard = [(n.channel, n.payload) for n in listener.notifies(timeout=30, stop_after=1)]
        assert heard == [("versions_changed", "base")]
        assert listener.execute("SELECT name, layers FROM versions").fetchall() == [("base", 3)]


@pytest.mark.parametrize("turn", [1, 2])
def test_every_test_gets_a_new_empty_database_of_its_own(postgres_dsn: str, turn: int) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        (name,) = conn.execute("SELECT current_database()").fetchone() or ("?",)
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        assert tables == [], f"turn {turn}: database {name} is not empty"
        assert name not in _databases_seen
        _databases_seen.append(name)
        conn.execute("CREATE TABLE left_behind (turn int)")  # the next turn must not see it
