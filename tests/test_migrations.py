"""Migrations 0002 to 0005 (log identity, durable consumers, partial key index, sparse
time index) on SQLite
and Postgres: a database at 0001 is refused by ``migrate=False``, upgraded by
``migrate=True`` with its history kept, and each downgrades cleanly. (That the
migrations match the metadata, and ship in the wheel, is tested in test_core.py.)"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text

from broadcast_history import Broadcast, EventLog, InvalidArgument, SchemaOutOfDate
from broadcast_history.log import (
    VERSION_TABLE,
    Pending,
    _migrate,
    head_revision,
    migration_engine,
    schema_revision,
)
from broadcast_history.log._migrate import alembic_config
from tests.support.postgres_support import ensure_database


async def _migrate_to(url: str, revision: str, *, down: bool = False) -> None:
    engine = migration_engine(url)
    try:
        async with engine.begin() as conn:

            def run(sync_conn: Any) -> None:
                config = alembic_config(sync_conn)
                if down:
                    command.downgrade(config, revision)
                else:
                    command.upgrade(config, revision)

            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: c.dialect.get_table_names(c)))
    finally:
        await engine.dispose()


@pytest.fixture(params=["log:sqlite-file", "log:postgres"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "log:sqlite-file":
        return f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    url = await ensure_database("bh_test_migrations")
    if VERSION_TABLE in await _tables(url):
        await _migrate_to(url, "base", down=True)
    await _drop_version_table(url)
    return url


async def _drop_version_table(url: str) -> None:
    engine = migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    finally:
        await engine.dispose()


async def test_upgrade_from_0001_keeps_history_and_adds_consumers(empty_url: str) -> None:
    await _migrate_to(empty_url, "0001")
    assert "broadcast_consumers" not in await _tables(empty_url)
    with pytest.raises(SchemaOutOfDate, match="0001"):
        await EventLog(empty_url, migrate=False).connect()

    engine = migration_engine(empty_url)
    try:
        async with engine.begin() as conn:  # a channel stored by the 0001 schema
            await conn.execute(
                text(
                    "INSERT INTO broadcast_channels (name, epoch, last_offset, last_timestamp,"
                    " first_offset) VALUES ('old', 7, 0, 0, 1)"
                )
            )
    finally:
        await engine.dispose()

    async with Broadcast(log=empty_url) as broadcast:  # migrate=True: to the head
        event = await broadcast.publish("old", "after the upgrade")
        assert (event.offset, event.epoch) == (1, 7)
        async with broadcast.subscribe("old", consumer="w", since=0) as sub:
            await sub.get()
            await sub.commit()
        [info] = await broadcast.log.consumers()
        assert (info.channel, info.position, info.lag) == ("old", 1, 0)
    async with Broadcast(log=empty_url, migrate=False):
        pass

    await _migrate_to(empty_url, "0001", down=True)
    tables = await _tables(empty_url)
    assert "broadcast_consumers" not in tables and "broadcast_log" not in tables
    assert "broadcast_events" in tables


async def _index_sql(url: str, name: str = "ux_broadcast_events_key") -> str:
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                query = f"SELECT sql FROM sqlite_master WHERE name = '{name}'"
            else:
                query = f"SELECT indexdef FROM pg_indexes WHERE indexname = '{name}'"
            return str((await conn.execute(text(query))).scalar_one())
    finally:
        await engine.dispose()


async def test_0004_indexes_keyed_events_only_and_keys_stay_unique(empty_url: str) -> None:
    await _migrate_to(empty_url, "0003")
    assert "WHERE" not in (await _index_sql(empty_url)).upper()
    with pytest.raises(SchemaOutOfDate, match="0003"):
        await EventLog(empty_url, migrate=False).connect()
    async with Broadcast(log=empty_url) as broadcast:  # migrate=True: to the head
        first = await broadcast.publish("keys", "a", key="k")
        await broadcast.publish("keys", "b")
        await broadcast.publish("keys", "c")
        # The key still finds the stored event after the index was rebuilt.
        assert await broadcast.publish("keys", "again", key="k") == first
    assert "IS NOT NULL" in (await _index_sql(empty_url)).upper()

    await _migrate_to(empty_url, "0003", down=True)
    assert "WHERE" not in (await _index_sql(empty_url)).upper()
    async with Broadcast(log=empty_url) as broadcast:
        assert [e.message async for e in _first(broadcast, 3)] == ["a", "b", "c"]


async def _first(broadcast: Broadcast, count: int) -> Any:
    async with broadcast.subscribe("keys", since=0) as sub:
        for _ in range(count):
            yield await sub.get()


async def test_0005_indexes_every_64th_event_by_time(empty_url: str) -> None:
    await _migrate_to(empty_url, "0004")
    assert "WHERE" not in (await _index_sql(empty_url, _TIME_INDEX)).upper()
    async with Broadcast(log=empty_url) as broadcast:  # migrate=True: to the head
        log = broadcast.log
        await log.append([Pending("t", f"m{i}", None) for i in range(200)])
        later = await log.append([Pending("t", "later", None)])
        assert await log.offset_at("t", later[0].timestamp) == 201
        page = await log.read("t", since=later[0].timestamp)
        assert [e.offset for e in page] == [201]
    assert re.search(r'"offset" % \(?64\b', await _index_sql(empty_url, _TIME_INDEX))

    await _migrate_to(empty_url, "0004", down=True)
    assert "WHERE" not in (await _index_sql(empty_url, _TIME_INDEX)).upper()
    with pytest.raises(SchemaOutOfDate, match="0004"):
        await EventLog(empty_url, migrate=False).connect()
    async with Broadcast(log=empty_url) as broadcast:
        assert await broadcast.log.offset_at("t", later[0].timestamp) == 201


_TIME_INDEX = "ix_broadcast_events_time"


async def test_a_schema_newer_than_this_version_is_refused_clearly(
    empty_url: str, tmp_path: Path
) -> None:
    """A newer version migrated the log (here: a revision this one does not ship):
    connecting, with or without migrate, is SchemaOutOfDate saying to upgrade the
    library (it was Alembic's CommandError, and `db check` advised `db upgrade`)."""
    await _migrate_to(empty_url, "head")
    await _stamp(empty_url, "0099")
    try:
        await _refused_as_newer(empty_url)
    finally:  # the Postgres database is the next test's: give it a known revision back
        await _stamp(empty_url, str(head_revision()))


def test_the_head_constant_is_alembics_head() -> None:
    """Starts read the revision without Alembic: its HEAD must be the shipped one."""
    from alembic.script import ScriptDirectory

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_a_start_on_a_current_log_imports_no_alembic(tmp_path: Path) -> None:
    """Alembic and what it brings (Mako, Pygments) took a third of the package's
    import time in every process start and CLI command; a log at the newest
    revision needs none of it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'l.db'}"
    program = f"""
import asyncio, sys
from broadcast_history import Broadcast

async def start(migrate):
    async with Broadcast(log={url!r}, migrate=migrate) as broadcast:
        await broadcast.publish("c", "m")

asyncio.run(start(True))
assert "alembic" in sys.modules  # made the schema
"""
    subprocess.run([sys.executable, "-c", program], check=True)
    program = f"""
import asyncio, sys
from broadcast_history import Broadcast
from broadcast_history.cli import main

async def start(migrate):
    async with Broadcast(log={url!r}, migrate=migrate) as broadcast:
        await broadcast.publish("c", "m")

asyncio.run(start(True))
asyncio.run(start(False))
assert "alembic" not in sys.modules, "imported"
"""
    subprocess.run([sys.executable, "-c", program], check=True)


async def _stamp(url: str, revision: str) -> None:
    engine = migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE {VERSION_TABLE} SET version_num = :r"), {"r": revision}
            )
    finally:
        await engine.dispose()


async def _refused_as_newer(empty_url: str) -> None:
    from typer.testing import CliRunner

    from broadcast_history.cli import app

    for migrate in (True, False):
        with pytest.raises(
            SchemaOutOfDate, match=r"0099.*does not know.*upgrade broadcast_history"
        ):
            async with Broadcast(log=empty_url, migrate=migrate):
                pass
    for command_line in (["db", "check"], ["db", "upgrade"], ["channels"]):
        # In a thread: the CLI runs its own event loop.
        result = await asyncio.to_thread(
            CliRunner().invoke, app, [*command_line, "--log", empty_url]
        )
        assert result.exit_code in (1, 3), (command_line, result.output)
        assert "upgrade broadcast_history" in result.output + result.stderr
        assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize(
    ("revision", "migrate"), [("0099", True), ("0099", False), ("0004", False)]
)
async def test_a_schema_only_refused_is_refused_without_waiting_for_the_lock(
    tmp_path: Path, revision: str, migrate: bool
) -> None:
    """A schema newer than the code (or one migrate=False only checks) went to the
    write path and waited for the lock first: 30 s behind a stalled SQLite writer
    (300 s on MySQL), then LogUnavailable, though nothing was to be written."""
    import sqlite3

    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    await _migrate_to(url, revision if revision != "0099" else "head")
    if revision == "0099":
        await _stamp(url, revision)
    holder = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:

        async def connect() -> None:
            async with Broadcast(log=url, migrate=migrate):
                pass

        with pytest.raises(SchemaOutOfDate, match=revision):
            await asyncio.wait_for(connect(), 10)
    finally:
        holder.rollback()
        holder.close()


async def test_a_stalled_migrator_on_postgres_is_waited_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holding the migration lock (stalled) kept every start with
    migrate on waiting for ever; it is now LogUnavailable after PG_LOCK_WAIT, as on
    MySQL."""
    import asyncpg

    from broadcast_history import LogUnavailable
    from broadcast_history.log import _migrate

    url = await ensure_database("bh_test_migrations_lock")
    await _drop_version_table(url)  # no schema yet: a start must migrate
    monkeypatch.setattr(_migrate, "PG_LOCK_WAIT", 0.5)
    stalled = await asyncpg.connect(url)
    try:
        await stalled.execute("BEGIN")
        await stalled.execute("SELECT pg_advisory_xact_lock($1)", _migrate._PG_LOCK_ID)

        async def connect() -> None:
            async with Broadcast(log=url):
                pass

        with pytest.raises(LogUnavailable, match="migrating the event log for too long"):
            await asyncio.wait_for(connect(), 20)
    finally:
        await stalled.close()


async def _postgres_at(name: str, revision: str) -> str:
    url = await ensure_database(name)
    if VERSION_TABLE in await _tables(url):
        await _migrate_to(url, "base", down=True)
    await _drop_version_table(url)
    await _migrate_to(url, revision)
    return url


async def test_an_index_swap_waits_little_for_a_long_transaction_on_postgres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DROP INDEX waited for a transaction reading the events table (a report, a
    pg_dump), and every read and append waited behind it: the whole app stalled for
    as long as that transaction lasted (found by a probe). The swap now tries for
    SWAP_TRY_MS at a time and lets statements through in between; past PG_LOCK_WAIT
    the migration gives up, changing nothing."""
    import asyncpg

    from broadcast_history import LogUnavailable

    url = await _postgres_at("bh_test_migrations_swap", "0004")
    blocker, reader = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM broadcast_events LIMIT 1")
        upgrade = asyncio.ensure_future(_migrate_to(url, "head"))
        longest = 0.0
        began = time.monotonic()
        while time.monotonic() - began < 4:  # the blocking transaction lasts 4 s
            start = time.monotonic()
            try:
                await reader.fetchval("SELECT count(*) FROM broadcast_events", timeout=3)
            except asyncio.TimeoutError:
                longest = 3.0  # waiting until the blocking transaction ends
                break
            longest = max(longest, time.monotonic() - start)
            await asyncio.sleep(0.05)
        assert not upgrade.done()  # still waiting for the table
        await blocker.execute("ROLLBACK")
        await asyncio.wait_for(upgrade, 30)
        assert longest < 2.0, f"a read waited {longest:.2f} s or more behind the migration"
        assert await schema_revision(url) == head_revision()

        # A table never free for PG_LOCK_WAIT: the migration gives up, nothing changed.
        await _migrate_to(url, "0004", down=True)
        monkeypatch.setattr(_migrate, "PG_LOCK_WAIT", 1.0)
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM broadcast_events LIMIT 1")
        with pytest.raises(LogUnavailable, match="could not have the events table"):
            await _migrate_to(url, "head")
        await blocker.execute("ROLLBACK")
        assert await schema_revision(url) == "0004"
    finally:
        await blocker.close()
        await reader.close()


def test_the_migrations_write_a_sql_script_for_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """`alembic upgrade --sql` (a script for a DBA to run): the index swap's tries need
    a live connection, and writing the script failed on it (found re-reading the change)."""
    import io

    from alembic.config import Config

    from broadcast_history.log._migrate import migrations_dir

    monkeypatch.setenv("BROADCAST_HISTORY_LOG", "postgresql+asyncpg://u@db/app")
    script = io.StringIO()
    config = Config(output_buffer=script)
    config.set_main_option("script_location", str(migrations_dir()))
    command.upgrade(config, "0003:head", sql=True)
    for index in ("ux_broadcast_events_key", "ix_broadcast_events_time"):
        assert f"DROP INDEX {index};" in script.getvalue()
        assert f"ALTER INDEX {index}_new RENAME TO {index};" in script.getvalue()


async def test_create_only_makes_a_schema_but_never_upgrades_one(empty_url: str) -> None:
    """``migrate="create"`` (the command line's tools): an older schema is refused as
    it is, under the migration lock too; an empty database gets the newest one."""
    await _migrate_to(empty_url, "0001")
    with pytest.raises(SchemaOutOfDate, match=r"0001.*db upgrade"):
        await EventLog(empty_url, migrate="create").connect()
    # The read phase said "nothing there"; another process made an older one since.
    log = EventLog(empty_url, migrate="create")
    engine = migration_engine(empty_url)
    try:
        async with engine.begin() as conn:
            with pytest.raises(SchemaOutOfDate, match="0001"):
                await _migrate.upgrade(conn, create_only=True)
    finally:
        await engine.dispose()
    assert await schema_revision(empty_url) == "0001"

    await _migrate_to(empty_url, "base", down=True)
    await _drop_version_table(empty_url)
    await log.connect()
    try:
        assert await schema_revision(empty_url) == head_revision()
    finally:
        await log.disconnect()
    with pytest.raises(InvalidArgument):
        EventLog(empty_url, migrate="yes")  # type: ignore[arg-type]
