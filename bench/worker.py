"""Run one scenario, for one implementation on one configuration, a few times.

``python -m bench.worker '<json job>'`` prints one JSON line: the figures of each run,
or the error that stopped them. Each run gets a fresh broadcast (for ours a fresh
SQLite file or an emptied Postgres or MySQL database, for JetStream a fresh stream), so
runs do not inherit each other's log.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
import uuid
from typing import Any

from . import bigfill
from .configs import (
    BY_NAME,
    OUT,
    Config,
    mysql_connect,
    mysql_log_url,
    postgres_log_url,
    postgres_url,
)
from .jetstream import JetStreamBroadcast
from .scenarios import SCENARIOS

HISTORY_SCENARIOS = {"replay", "first_event"}


async def _empty_postgres() -> None:
    import asyncpg

    from broadcast_history import EventLog

    log = EventLog(postgres_log_url())
    await log.connect()
    await log.disconnect()
    conn = await asyncpg.connect(postgres_url())
    try:
        await conn.execute("TRUNCATE broadcast_events, broadcast_channels")
    finally:
        await conn.close()


async def _empty_mysql() -> None:
    from broadcast_history import EventLog

    log = EventLog(mysql_log_url())
    await log.connect()
    await log.disconnect()
    conn = await mysql_connect(mysql_log_url().rsplit("/", 1)[1])
    try:
        async with conn.cursor() as cursor:
            for table in ("broadcast_events", "broadcast_channels"):
                await cursor.execute(f"TRUNCATE TABLE {table}")
    finally:
        conn.close()


async def _make(job: dict[str, Any], config: Config | None) -> tuple[Any, list[str]]:
    """A broadcast for this run, and the files to remove afterwards."""
    kafka = job.get("kafka")
    if job["impl"] == "jetstream":
        # A fresh stream per run (see bench.jetstream), as ours gets a fresh log.
        return JetStreamBroadcast(job["nats"]), []
    assert config is not None
    if job["impl"] == "theirs":
        import broadcaster

        return broadcaster.Broadcast(config.theirs_url(kafka)), []
    from broadcast_history import Broadcast

    scenario = job["scenario"]
    garbage: list[str] = []
    if scenario in HISTORY_SCENARIOS:
        log, _ = await bigfill.ensure(config.log, job["params"]["size"])
    elif config.log == "sqlite":
        (OUT / "tmp").mkdir(parents=True, exist_ok=True)
        path = str(OUT / "tmp" / f"{uuid.uuid4().hex}.db")
        garbage = [path, path + "-wal", path + "-shm"]
        log = f"sqlite+aiosqlite:///{path}"
    elif config.log == "mysql":
        await _empty_mysql()
        log = mysql_log_url()
    else:
        await _empty_postgres()
        log = postgres_log_url()
    metrics: Any = False
    if job.get("metrics"):
        from prometheus_client import CollectorRegistry

        metrics = CollectorRegistry()
    return Broadcast(config.ours_url(kafka), log=log, metrics=metrics), garbage


async def _run(job: dict[str, Any]) -> list[dict[str, Any]]:
    import pathlib

    config = BY_NAME.get(job["config"])  # None for the JetStream peer
    scenario = SCENARIOS[job["scenario"]]
    runs = []
    for _ in range(job["repeats"]):
        broadcast, garbage = await _make(job, config)
        try:
            async with broadcast:
                # One subscription held throughout, for both libraries: broadcaster's
                # Redis listener can stall for good when its last channel is left and
                # another subscribed right after (a race in 0.3.1).
                async with broadcast.subscribe(f"run-keep-{uuid.uuid4().hex[:10]}"):
                    figures = scenario(broadcast, **job["params"])
                    runs.append(await asyncio.wait_for(figures, job["timeout"]))
        finally:
            for path in garbage:
                pathlib.Path(path).unlink(missing_ok=True)
    return runs


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        result: dict[str, Any] = {"runs": asyncio.run(_run(job))}
    except TimeoutError:
        result = {
            "error": "timed out: events never arrived",
            "trace": traceback.format_exc()[-3000:],
        }
    except BaseException as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        result = {"error": detail[-300:], "trace": traceback.format_exc()[-3000:]}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
