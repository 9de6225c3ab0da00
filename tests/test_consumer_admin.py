"""Durable consumers for operators: HistoryAdmin, the HTTP routes and the CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from typer.testing import CliRunner

from broadcast_history import (
    Broadcast,
    ConsumerBusy,
    HistoryTruncated,
    InvalidArgument,
    OffsetOutOfRange,
)
from broadcast_history.admin import (
    ChannelNotFound,
    ConsumerInfo,
    ConsumerNotFound,
    HistoryAdmin,
    create_app,
)
from broadcast_history.cli import _consumers as _consumers_cli
from broadcast_history.cli import app as cli_app
from tests.support.admin_support import LOG_KINDS, fresh_log_url

TOKEN = "consumers-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=LOG_KINDS)
async def broadcast(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broadcast]:
    url = await fresh_log_url(request.param, tmp_path)
    async with Broadcast("memory://", log=url) as b:
        for i in range(10):
            await b.publish("orders/eu", f"order {i}")
        yield b


async def test_positions_set_at_once_for_a_new_consumer_all_store(broadcast: Broadcast) -> None:
    """On MySQL, concurrent sets creating the same consumer deadlocked each other
    (InnoDB's gap locks: an UPDATE that matched nothing, then an INSERT, in one
    transaction): most failed as LogUnavailable, a 503 over HTTP (found by a probe)."""
    for i in range(10):
        await broadcast.publish("racing", str(i))
    admin = HistoryAdmin.of(broadcast)
    for name in ("a", "b", "c"):
        results = await asyncio.gather(
            *(admin.set_consumer("racing", name, position) for position in range(8)),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["ConsumerInfo"] * 8
        (info,) = [c for c in await admin.consumers("racing") if c.name == name]
        assert info.position in range(8)


async def test_history_admin(broadcast: Broadcast) -> None:
    admin = HistoryAdmin.of(broadcast)
    assert await admin.consumers() == []
    info = await admin.set_consumer("orders/eu", "mailer", 4)
    assert (info.channel, info.name, info.position, info.lag, info.holder) == (
        "orders/eu",
        "mailer",
        4,
        6,
        None,
    )
    async with broadcast.subscribe("orders/eu", consumer="mailer") as sub:
        assert (await sub.get()).offset == 5
        await sub.commit()
        [held] = await admin.consumers("orders/eu")
        assert held.holder is not None and held.lag == 5
        with pytest.raises(ConsumerBusy):
            await admin.set_consumer("orders/eu", "mailer", 0)
        with pytest.raises(ConsumerBusy):
            await admin.delete_consumer("orders/eu", "mailer")
    assert await admin.set_consumer("orders/eu", "mailer", 0) == ConsumerInfo(
        "orders/eu", "mailer", held.epoch, 0, 10, (await admin.consumers())[0].updated_at, None
    )
    with pytest.raises(ChannelNotFound):
        await admin.set_consumer("nowhere", "mailer", 0)
    with pytest.raises(OffsetOutOfRange):
        await admin.set_consumer("orders/eu", "mailer", 11)
    await broadcast.log.trim("orders/eu", before=5)
    with pytest.raises(HistoryTruncated):
        await admin.set_consumer("orders/eu", "mailer", 2)
    await admin.delete_consumer("orders/eu", "mailer")
    with pytest.raises(ConsumerNotFound):
        await admin.delete_consumer("orders/eu", "mailer")
    assert await admin.consumers("nowhere") == []


async def test_http_routes(broadcast: Broadcast) -> None:
    transport = httpx.ASGITransport(app=create_app(broadcast, token=TOKEN))
    route = f"/channels/{quote('orders/eu', safe='')}/consumers"
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as http:
        assert (await http.get("/consumers")).json() == {"consumers": [], "next_cursor": None}
        put = await http.put(f"{route}/mailer", json={"position": 3})
        assert put.status_code == 200
        body = put.json()
        assert {k: body[k] for k in ("channel", "name", "position", "lag", "holder")} == {
            "channel": "orders/eu",
            "name": "mailer",
            "position": 3,
            "lag": 7,
            "holder": None,
        }
        async with broadcast.subscribe("orders/eu", consumer="indexer"):
            listed = (await http.get("/consumers", params={"channel": "orders/eu"})).json()
            assert [
                (c["name"], c["position"], c["holder"] is not None) for c in listed["consumers"]
            ] == [
                ("indexer", None, True),
                ("mailer", 3, False),
            ]
            busy = await http.delete(f"{route}/indexer")
            assert busy.status_code == 409 and "held" in busy.json()["detail"]
        assert (await http.put(f"{route}/mailer", json={"position": 11})).status_code == 409
        for bad in (-1, True, "3", 3.0):
            assert (await http.put(f"{route}/mailer", json={"position": bad})).status_code == 422
        assert (
            await http.put("/channels/none/consumers/x", json={"position": 0})
        ).status_code == 404
        assert (await http.get("/consumers", params={"channel": ""})).status_code == 400
        assert (await http.delete(f"{route}/mailer")).status_code == 204
        assert (await http.delete(f"{route}/mailer")).status_code == 404
        assert (await http.get("/consumers")).json() == {"consumers": [], "next_cursor": None}


async def test_consumers_are_listed_a_page_at_a_time(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every consumer ever committed stays until deleted (a name per session leaves
    one each): the listing, over HTTP too, was one answer with all of them."""
    from broadcast_history.admin import _consumers

    admin = HistoryAdmin.of(broadcast)
    await broadcast.publish("a", "x")
    for channel, name in [("orders/eu", "b"), ("a", "z"), ("orders/eu", "a"), ("orders/eu", "é")]:
        await admin.set_consumer(channel, name, 1)
    everyone = [(c.channel, c.name) for c in await admin.consumers()]
    assert everyone == [("a", "z"), ("orders/eu", "a"), ("orders/eu", "b"), ("orders/eu", "é")]
    first = await admin.consumers(limit=2)
    rest = await admin.consumers(after=(first[-1].channel, first[-1].name), limit=2)
    assert [(c.channel, c.name) for c in first + rest] == everyone
    assert await admin.consumers(after=everyone[-1]) == []
    of_orders = await admin.consumers("orders/eu", after=("orders/eu", "a"))
    assert [c.name for c in of_orders] == ["b", "é"]
    # A cursor of another channel: before it, the whole channel; after it, nothing.
    assert len(await admin.consumers("orders/eu", after=("a", "z"))) == 3
    assert await admin.consumers("a", after=("orders/eu", "a")) == []
    # A page is cut before its channels are looked up: each row still gets its own
    # channel's head, and a consumer of a deleted channel no lag.
    await broadcast.publish("orders/eu", "one more")
    await admin.delete("a")
    page = await admin.consumers(after=everyone[0], limit=2)
    assert [(c.channel, c.name, c.position, c.lag) for c in page] == [
        ("orders/eu", "a", 1, 10),
        ("orders/eu", "b", 1, 10),
    ]
    assert [c.lag for c in await admin.consumers(limit=1)] == [None]
    monkeypatch.setattr(_consumers, "CONSUMER_PAGE", 1)
    assert [(c.channel, c.name) async for c in admin.all_consumers()] == everyone
    for bad in ({"limit": 0}, {"limit": 10_001}, {"after": ("a",)}, {"after": ("a", "")}):
        with pytest.raises(InvalidArgument):
            await admin.consumers(**bad)  # type: ignore[arg-type]

    transport = httpx.ASGITransport(app=create_app(broadcast, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as http:
        seen, cursor = [], None
        while True:
            params = {"limit": 3} | ({"after": cursor} if cursor else {})
            body = (await http.get("/consumers", params=params)).json()
            seen += [(c["channel"], c["name"]) for c in body["consumers"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert seen == everyone
        for bad_cursor in ("x", '["a"]', "[1, 2]", '["a", ""]', "[" * 1000):
            answer = await http.get("/consumers", params={"after": bad_cursor})
            assert answer.status_code == 400, bad_cursor
        assert (await http.get("/consumers", params={"limit": 0})).status_code == 422


async def test_idle_consumers_are_deleted_on_request(
    broadcast: Broadcast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's row stays until deleted (a name per session leaves one each): the
    operator forgets those nobody holds that committed nothing for a while, a batch
    at a time; a held or recently used one stays."""
    from broadcast_history.log import _consumer_log

    log, admin = broadcast.log, HistoryAdmin.of(broadcast)
    monkeypatch.setattr(_consumer_log, "IDLE_BATCH", 2)
    await broadcast.publish("other", "x")
    for name in ("s1", "s2", "s3", "s4"):
        await admin.set_consumer("orders/eu", name, 1)
    await admin.set_consumer("other", "s1", 1)
    # A holder that died before committing or releasing: its lease ran out.
    assert (await log.acquire_lease("orders/eu", "crashed", "dead-holder", 0.1)).acquired
    async with broadcast.subscribe("orders/eu", consumer="held", since=0) as held:
        await held.get()
        await held.commit()
        await asyncio.sleep(0.7)
        await admin.set_consumer("orders/eu", "s4", 2)  # used again just now
        idle = timedelta(seconds=0.4)
        assert await admin.delete_idle_consumers(idle, channel="nobody") == 0
        # Batches of 2, each deleting a range of keys with held or used ones inside.
        assert await admin.delete_idle_consumers(idle, channel="orders/eu") == 4
        assert await admin.delete_idle_consumers(idle) == 1  # that of "other"
        assert [(c.channel, c.name) for c in await admin.consumers()] == [
            ("orders/eu", "held"),
            ("orders/eu", "s4"),
        ]
    # Held until just now, though its last commit is old: not idle (a worker on a
    # quiet channel, restarted by a deploy, lost its position to a review's prune).
    assert await admin.delete_idle_consumers(timedelta(seconds=0.4)) == 0
    for bad in (timedelta(0), timedelta(seconds=-1), 10, timedelta(days=36_601), timedelta.max):
        with pytest.raises(InvalidArgument):
            await admin.delete_idle_consumers(bad)  # type: ignore[arg-type]

    transport = httpx.ASGITransport(app=create_app(broadcast, token=TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as http:
        await asyncio.sleep(0.4)
        answer = await http.delete("/consumers", params={"idle_for": 0.2, "channel": "x"})
        assert answer.json() == {"deleted": 0}
        answer = await http.delete("/consumers", params={"idle_for": 0.2})
        assert answer.status_code == 200 and answer.json() == {"deleted": 2}
        for params in ({}, {"idle_for": 0}, {"idle_for": 1e-7}, {"idle_for": 1e12}):
            assert (await http.delete("/consumers", params=params)).status_code == 422
        assert (
            await http.delete("/consumers", params={"idle_for": 1, "channel": ""})
        ).status_code == 400
    assert await admin.consumers() == []


async def _seed(url: str) -> None:
    async with Broadcast(log=url) as broadcast:
        for i in range(10):
            await broadcast.publish("orders/eu", f"order {i}")


@pytest.mark.parametrize("kind", LOG_KINDS)
def test_cli(kind: str, tmp_path: Path) -> None:
    log = asyncio.run(fresh_log_url(kind, tmp_path))
    asyncio.run(_seed(log))
    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli_app, [*args, "--log", log])
        assert result.exit_code == code, (args, result.stdout, result.stderr)
        return result.stdout + result.stderr

    assert "no durable consumers" in cli("consumers")
    assert "position 4" in cli("consumer", "set", "orders/eu", "mailer", "4")
    assert "beyond the head" in cli("consumer", "set", "orders/eu", "mailer", "99", code=1)
    table = cli("consumers", "orders/eu")
    assert "mailer" in table and "Lag" in table and " 6 " in table
    [line] = cli("consumers", "--json").splitlines()
    assert json.loads(line)["lag"] == 6
    # The table shows a page (250,000 rows took two minutes and 1.3 GB); JSON all.
    cli("consumer", "set", "orders/eu", "second", "4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_consumers_cli, "TABLE_ROWS", 1)
        shown = cli("consumers")
        assert "mailer" in shown and "second" not in shown and "--json lists every" in shown
        assert len(cli("consumers", "--json").splitlines()) == 2
    cli("consumer", "delete", "orders/eu", "second")
    assert "deleted" in cli("consumer", "delete", "orders/eu", "mailer")
    assert "no consumer" in cli("consumer", "delete", "orders/eu", "mailer", code=1)
    # Names are printed as they are, never read as Rich markup (a name of "[red]x[/]"
    # came out as '\x\').
    said = cli("consumer", "set", "orders/eu", "[red]x[/]", "1")
    assert "consumer '[red]x[/]' of 'orders/eu'" in said
    assert "deleted consumer '[red]x[/]'" in cli("consumer", "delete", "orders/eu", "[red]x[/]")
    cli("consumer", "set", "orders/eu", "idle", "1")
    assert "deleted 0 idle consumers" in cli("consumer", "prune", "--idle-days", "1", "--yes")
    time.sleep(0.3)
    pruned = cli("consumer", "prune", "--idle-days", "0.000002", "--channel", "orders/eu", "-y")
    assert "deleted 1 idle consumer of 'orders/eu'" in pruned
    assert "no durable consumers" in cli("consumers")
    for days in ("0", "-1", "1e9"):
        assert "--idle-days" in cli("consumer", "prune", "--idle-days", days, "-y", code=2)


async def test_a_position_set_after_the_lease_ran_out_is_not_overwritten(
    broadcast: Broadcast,
) -> None:
    """A holder that stopped renewing (a paused process) may renew late while nobody
    touched its consumer; once an operator set the position, it can neither renew
    nor commit over it."""
    log, admin = broadcast.log, HistoryAdmin.of(broadcast)
    info = await log.channel("orders/eu")
    assert info is not None
    for name, holder in (("mailer", "paused-1"), ("audit", "paused-2")):
        assert (await log.acquire_lease("orders/eu", name, holder, 0.2)).acquired
        assert await log.commit_position("orders/eu", name, holder, info.epoch, 8, 0.2) == 8
    await asyncio.sleep(0.4)  # both leases ran out
    await admin.set_consumer("orders/eu", "mailer", 3)
    leases = [("orders/eu", "mailer", "paused-1"), ("orders/eu", "audit", "paused-2")]
    assert await log.renew_leases(leases, 10.0) == {"paused-2"}
    assert await log.commit_position("orders/eu", "mailer", "paused-1", info.epoch, 9, 10) is None
    positions = {c.name: (c.position, c.holder) for c in await admin.consumers("orders/eu")}
    assert positions == {"mailer": (3, None), "audit": (8, "paused-2")}
