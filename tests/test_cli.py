"""The broadcast-history command line, through Typer's runner and as real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from alembic import command
from typer.testing import CliRunner

from broadcast_history import Broadcast
from broadcast_history.cli import app
from broadcast_history.log._migrate import alembic_config
from tests.support.admin_support import LOG_KINDS, fresh_log_url

runner = CliRunner()
EXE = [sys.executable, "-c", "from broadcast_history.cli import main; main()"]


@pytest.fixture(params=LOG_KINDS)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return asyncio.run(fresh_log_url(request.param, tmp_path))


def cli(*args: str, input: str | None = None, code: int = 0, **env: str):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, list(args), input=input, env=env or None)
    assert result.exit_code == code, (args, result.stdout, result.stderr, result.exception)
    return result


def json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_publish_and_events(log: str) -> None:
    cli("publish", "room/1", "hello wörld", "--log", log)
    cli("publish", "room/1", "AAEC", "--base64", "--key", "k1", "--log", log)
    out = cli("publish", "room/1", "-", "--json", "--log", log, input="from stdin").stdout
    assert json_lines(out)[0]["offset"] == 3
    # The same key again stores nothing new.
    out = cli("publish", "room/1", "AAEC", "--base64", "--key", "k1", "--json", "--log", log)
    assert json_lines(out.stdout)[0]["offset"] == 2

    events = json_lines(cli("events", "room/1", "--json", "--log", log).stdout)
    assert [(e["offset"], e["encoding"], e["message"]) for e in events] == [
        (1, "text", "hello wörld"),
        (2, "base64", "AAEC"),
        (3, "text", "from stdin"),
    ]
    result = cli("events", "room/1", "--json", "--desc", "--limit", "2", "--log", log)
    assert [e["offset"] for e in json_lines(result.stdout)] == [3, 2]
    assert "more: --before 2 --limit 2 --desc" in result.stderr  # the filters kept
    result = cli(
        "events",
        "room/1",
        "--json",
        "--since",
        "2000-01-01T00:00Z",
        "--limit",
        "1",
        "--before",
        "3",
        "--log",
        log,
    )
    assert "more: --after 1 --before 3 --since 2000-01-01T00:00Z --limit 1" in result.stderr
    result = cli("events", "room/1", "--json", "--after", "1", "--before", "3", "--log", log)
    assert [e["offset"] for e in json_lines(result.stdout)] == [2]
    since = events[1]["timestamp"]
    result = cli("events", "room/1", "--json", "--since", since, "--log", log)
    assert [e["offset"] for e in json_lines(result.stdout)] == [2, 3]
    result = cli("events", "room/1", "--json", "--until", since, "--log", log)
    assert [e["offset"] for e in json_lines(result.stdout)] == [1]
    table = cli("events", "room/1", "--log", log).stdout
    assert "hello wörld" in table and "<3 bytes: 00 01 02>" in table

    one = json_lines(cli("event", "room/1", "3", "--log", log).stdout)[0]
    assert one["message"] == "from stdin"
    cli("event", "room/1", "9", "--log", log, code=1)


def test_a_page_of_big_events_is_bounded_in_bytes(tmp_path: Path) -> None:
    """``events --limit 10000`` on a channel of 1 MB messages loaded them all (about
    10 GB at the default largest message), where the HTTP API stops a page at 8 MiB."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"

    async def fill() -> None:
        async with Broadcast(log=log) as broadcast:
            for _ in range(12):
                await broadcast.publish("big", "x" * 1_000_000)

    asyncio.run(fill())
    result = cli("events", "big", "--json", "--limit", "12", "--log", log)
    offsets = [e["offset"] for e in json_lines(result.stdout)]
    assert offsets == list(range(1, 9))  # up to 8 MiB of messages
    assert "more: --after 8 --limit 12" in result.stderr


def test_channels_and_stats(log: str) -> None:
    for name in ["a/1", "a/2", "a/3", "b"]:
        cli("publish", name, "x", "--log", log)
    result = cli("channels", "--prefix", "a/", "--limit", "2", "--json", "--log", log)
    assert [c["name"] for c in json_lines(result.stdout)] == ["a/1", "a/2"]
    assert "more: --after a/2 --prefix a/ --limit 2" in result.stderr
    result = cli("channels", "--prefix", "a/", "--after", "a/2", "--json", "--log", log)
    assert [c["name"] for c in json_lines(result.stdout)] == ["a/3"]
    table = cli("channels", "--log", log).stdout
    assert "a/1" in table
    # Piped, a table is as wide as its cells: Rich would cut them at 80 columns.
    epoch = json_lines(cli("channels", "--json", "--log", log).stdout)[0]["epoch"]
    assert str(epoch) in table and "…" not in table
    stats = json_lines(cli("stats", "--json", "--log", log).stdout)[0]
    assert (stats["channels"], stats["events"], stats["trimmed"]) == (4, 4, 0)
    assert "channels: 4" in cli("stats", "--log", log).stdout
    # The next page's option is quoted for the shell (JSON's "\u00e9" named another
    # channel, and the shell expanded a "$HOME").
    for name in ("c/\u00e9", "c/\u00e9$HOME"):
        cli("publish", name, "x", "--log", log)
    result = cli("channels", "--prefix", "c/", "--limit", "1", "--log", log)
    assert "more: --after 'c/\u00e9' --prefix c/ --limit 1" in result.stderr
    result = cli("channels", "--prefix", "c/\u00e9", "--limit", "1", "--log", log)
    assert "more: --after 'c/\u00e9' --prefix 'c/\u00e9' --limit 1" in result.stderr


def test_trim_and_delete(log: str) -> None:
    for i in range(5):
        cli("publish", "t", str(i), "--log", log)
    assert "removed 2 events" in cli("trim", "t", "--before", "3", "--log", log).stdout
    now = datetime.now(timezone.utc).isoformat()
    assert "removed 3 events" in cli("trim", "t", "--before-time", now, "--log", log).stdout
    cli("trim", "t", "--log", log, code=2)
    cli("trim", "missing", "--before", "1", "--log", log, code=1)

    epoch = json_lines(cli("publish", "t", "x", "--json", "--log", log).stdout)[0]["epoch"]
    result = cli("delete", "t", "--log", log, input="n\n", code=1)
    assert "Aborted" in result.stderr
    cli("delete", "t", "--log", log, input="y\n")
    cli("delete", "t", "-y", "--log", log, code=1)
    again = json_lines(cli("publish", "t", "y", "--json", "--log", log).stdout)[0]
    assert again["offset"] == 1 and again["epoch"] != epoch


def test_export_to_a_file_syncs_it_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export was renamed into place unsynced: a power loss soon after could
    leave a backup reported written as an empty file."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"
    cli("publish", "room", "m", "--log", log)
    steps: list[str] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd: int) -> None:
        steps.append("fsync " + ("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def renamed(source: str, target: str) -> None:
        steps.append("replace")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    cli("export", "-o", str(tmp_path / "backup.jsonl"), "--log", log)
    assert steps[-3:] == ["fsync file", "replace", "fsync dir"]


def test_export_import(log: str, tmp_path: Path) -> None:
    cli("publish", "e/1", "AP8=", "--base64", "--log", log)
    cli("publish", "e/1", "two", "--key", "k", "--log", log)
    cli("publish", "e/2", "three", "--log", log)
    dump = tmp_path / "dump.jsonl"
    assert "exported 3 events" in cli("export", "-o", str(dump), "--log", log).stderr
    assert cli("export", "--log", log).stdout == dump.read_text()
    assert len(cli("export", "e/2", "--log", log).stdout.splitlines()) == 3  # with the end line
    cli("export", "nope", "-o", str(tmp_path / "x.jsonl"), "--log", log, code=1)
    assert not (tmp_path / "x.jsonl").exists()
    # A failed export removes only a file it created (a path of /dev/null's was
    # deleted, a device node when run as root).
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    cli("export", "nope", "-o", str(mine), "--log", log, code=1)
    assert mine.read_text() == "mine"  # not emptied either (a backup a typo lost)
    cli("export", "-o", str(mine), "--log", log)
    assert mine.read_text() == dump.read_text()
    # Through a link, to the file it points to; a new file gets the usual mode (the
    # temporary file it was written as is private).
    link = tmp_path / "link.jsonl"
    link.symlink_to(mine)
    cli("export", "-o", str(link), "--log", log)
    assert link.is_symlink() and mine.read_text() == dump.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert (dump.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    missing = cli("export", "-o", str(tmp_path / "no" / "x.jsonl"), "--log", log, code=2)
    assert "cannot write" in missing.stderr and missing.exception is not None
    assert isinstance(missing.exception, SystemExit)  # one error line, no traceback

    result = cli("import", str(dump), "--log", log, code=1)
    assert "already exists" in result.stderr
    target = f"sqlite+aiosqlite:///{tmp_path / 'copy.db'}"
    result = cli("import", str(dump), "--log", target)
    assert "imported 3 events in 2 channels" in result.stderr
    assert cli("export", "--log", target).stdout == dump.read_text()
    other = f"sqlite+aiosqlite:///{tmp_path / 'stdin.db'}"
    cli("import", "-", "--log", other, input=dump.read_text())
    assert cli("export", "--log", other).stdout == dump.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "event"}\n')
    assert "line 1" in cli("import", str(bad), "--log", other, code=2).stderr
    cli("import", str(tmp_path / "none.jsonl"), "--log", other, code=2)
    # A pipe, as `import <(zcat backup.jsonl.gz)` gives: "no such file" before.
    piped = f"sqlite+aiosqlite:///{tmp_path / 'piped.db'}"
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(dump.read_text())

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        cli("import", f"/dev/fd/{read_end}", "--log", piped)
    finally:
        writer.join()
        os.close(read_end)
    assert cli("export", "--log", piped).stdout == dump.read_text()
    assert "is a directory" in cli("import", str(tmp_path), "--log", piped, code=2).stderr


def test_export_and_import_edges(tmp_path: Path) -> None:
    """Found by a probe: a channel named twice was exported twice (a file the import
    refuses); a full disk ended the export with a traceback; an import of a whole
    log named every channel on one line of megabytes; an empty input imported."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'edges.db'}"
    for i in range(12):
        cli("publish", f"c{i:02}", "m", "--log", log)
    twice = tmp_path / "twice.jsonl"
    assert "exported 1 events" in cli("export", "c00", "c00", "-o", str(twice), "--log", log).stderr
    copy = f"sqlite+aiosqlite:///{tmp_path / 'copy.db'}"
    cli("import", str(twice), "--log", copy)
    full = cli("export", "-o", "/dev/full", "--log", log, code=1)
    assert "cannot write /dev/full: No space left on device" in full.stderr
    assert isinstance(full.exception, SystemExit)  # one error line, no traceback
    whole = tmp_path / "whole.jsonl"
    cli("export", "-o", str(whole), "--log", log)
    report = cli("import", str(whole), "--log", f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    assert report.stderr.strip().endswith("'c09' and 2 more"), report.stderr
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    refused = cli("import", str(empty), "--log", copy, code=2)
    assert "the input is empty" in refused.stderr


def test_db_commands(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    cli("db", "check", "--log", url, code=3)  # no file yet
    (tmp_path / "db.sqlite").touch()
    assert "(no schema)" in cli("db", "current", "--log", url).stdout
    checked = cli("db", "check", "--log", url, code=1).stderr
    assert "has no schema yet" in checked and "db upgrade" in checked  # was "at nothing"
    assert "schema at 0005" in cli("db", "upgrade", "--log", url).stdout
    assert "current: 0005" in cli("db", "current", "--log", url).stdout
    cli("db", "check", "--log", url)


def test_commands_create_a_schema_but_never_upgrade_one(tmp_path: Path) -> None:
    # An older app may still run on an older schema: only `db upgrade` moves it.
    old = tmp_path / "old.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{old}")
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
    engine.dispose()
    url = f"sqlite+aiosqlite:///{old}"
    for args in (
        ["channels"],
        ["events", "c"],
        ["publish", "c", "x"],
        ["trim", "c", "--before", "1"],
    ):
        assert "db upgrade" in cli(*args, "--log", url, code=3).stderr
    assert "current: 0001" in cli("db", "current", "--log", url).stdout
    # An empty database gets the tables, as the app would make them.
    (tmp_path / "empty.db").touch()
    empty = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    assert cli("channels", "--json", "--log", empty).stdout.strip() == ""
    cli("db", "check", "--log", empty)


def test_db_check_after_publish(log: str) -> None:
    cli("publish", "c", "x", "--log", log)  # creates the schema
    assert "schema is current" in cli("db", "check", "--log", log).stdout


def test_connection_errors(tmp_path: Path) -> None:
    missing = f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}"
    assert "no event log at" in cli("channels", "--log", missing, code=3).stderr
    assert not (tmp_path / "missing.db").exists()
    result = cli("channels", "--log", "postgresql://postgres@127.0.0.1:1/x", code=3)
    assert "cannot open the event log" in result.stderr
    assert "Unsupported log database" in cli("channels", "--log", "oracle://x/y", code=2).stderr
    cli("publish", "c", "x", "--log", missing, "--url", "nosuch://", code=2)
    log = f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}"
    cli("publish", "c", "x", "--log", log)
    assert "timezone" in cli("events", "c", "--since", "2024-01-01", "--log", log, code=2).stderr
    assert "control character" in cli("events", "bad\x01", "--log", log, code=2).stderr
    cli("events", "missing", "--log", log, code=1)
    # The environment variable names the log as well as --log does.
    assert "c" in cli("channels", BROADCAST_HISTORY_LOG=log).stdout


def test_tail_history_in_process(tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
    for i in range(4):
        cli("publish", "c", f"m{i}", "--log", log)
    result = cli("tail", "c", "--history", "2", "--count", "2", "--json", "--log", log)
    assert [e["message"] for e in json_lines(result.stdout)] == ["m2", "m3"]
    result = cli("tail", "c", "--since", "1", "--count", "1", "--log", log)
    assert "#2 m1" in result.stdout
    cli("tail", "c", "--since", "1", "--history", "1", "--log", log, code=2)
    refused = cli("tail", "c", "--last-event-id", "garbage", "--log", log, code=2)
    assert "must be <epoch>:<offset> or an offset" in refused.stderr  # not "an integer"
    cli("tail", "c", "--last-event-id", "x:1", "--log", log, code=2)
    epoch = json_lines(cli("event", "c", "1", "--log", log).stdout)[0]["epoch"]
    result = cli("tail", "c", "--last-event-id", f"{epoch}:2", "--count", "1", "--log", log)
    assert "#3 m2" in result.stdout


def test_messages_reach_the_terminal_without_their_control_characters(tmp_path: Path) -> None:
    """A published message's escape sequences went to the operator's terminal as they
    were (erase a line, set the title, write the clipboard; found by a probe)."""
    log = f"sqlite+aiosqlite:///{tmp_path / 'esc.db'}"
    hostile = "ok\x1b[2K\x1b[1A\x1b]52;c;cHduZWQ=\x07\x00\x9b2J\u202eevil"
    cli("publish", "c", hostile, "--log", log)
    unsafe = ("\x1b", "\x00", "\x07", "\x9b", "\u202e")
    for args in (["tail", "c", "--since", "0", "--count", "1"], ["events", "c"]):
        shown = cli(*args, "--log", log).stdout
        assert "ok␛[2K" in shown and not any(c in shown for c in unsafe), (args, shown)
        as_json = cli(*args, "--json", "--log", log).stdout
        assert not any(c in as_json for c in unsafe), (args, as_json)
        assert json_lines(as_json)[0]["message"] == hostile


async def _publish_soon(log: str, message: str) -> None:
    from broadcast_history import Broadcast

    await asyncio.sleep(0.5)
    async with Broadcast(log=log) as broadcast:
        await broadcast.publish("c", message)


def test_tail_says_reset_and_goes_on(tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    cli("publish", "c", "m0", "--log", log)
    # Published from another thread while tail waits (it polls the log: memory://).
    later = threading.Thread(target=asyncio.run, args=(_publish_soon(log, "m1"),))
    later.start()
    result = cli("tail", "c", "--since", "99", "--count", "1", "--json", "--log", log)
    later.join()
    reset, event = json_lines(result.stdout)
    assert reset == {
        "type": "reset",
        "id": f"{event['epoch']}:1",
        "channel": "c",
        "reason": "OffsetOutOfRange",
        "epoch": event["epoch"],
        "head": 1,
    }
    assert (event["offset"], event["message"]) == (2, "m1")


# -- real processes -------------------------------------------------------------------------


def _wait_for(stream_line: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if stream_line in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"{stream_line!r} never printed (exit code {proc.poll()})")


@contextmanager
def _tailing(log: str, *options: str) -> Iterator[subprocess.Popen[str]]:
    """``broadcast-history tail room OPTIONS`` on ``log``, once it says it is tailing."""
    env = {**os.environ, "BROADCAST_HISTORY_LOG": log}
    tail = subprocess.Popen(
        [*EXE, "tail", "room", *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for("tailing", tail)
        yield tail
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()


def test_tail_and_publish_in_two_processes(log: str) -> None:
    # The publishes from this process (a process of the CLI costs seconds to start).
    cli("publish", "room", "before", BROADCAST_HISTORY_LOG=log)
    with _tailing(log, "--since", "0", "--json") as tail:
        for message in ("one", "two"):
            cli("publish", "room", message, BROADCAST_HISTORY_LOG=log)
        assert tail.stdout is not None
        seen = [json.loads(tail.stdout.readline())["message"] for _ in range(3)]
        assert seen == ["before", "one", "two"]
        tail.send_signal(signal.SIGINT)  # Ctrl-C
        assert tail.wait(timeout=20) == 0


def test_tail_interrupted_before_its_count_says_so(tmp_path: Path) -> None:
    """Ctrl-C before --count events were printed exited 0: a script took the
    events it got for all it asked for."""
    with _tailing(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}", "--count", "2") as tail:
        tail.send_signal(signal.SIGINT)
        assert tail.wait(timeout=20) == 130


def test_serve(tmp_path: Path) -> None:
    log = f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    cli("serve", "--log", log, code=2)  # no token
    refused = cli("serve", "--log", log, code=2, BROADCAST_HISTORY_TOKEN="two words")
    assert "printable ASCII" in refused.stderr and refused.exception is not None
    assert isinstance(refused.exception, SystemExit)  # an error line, not a traceback
    cli("publish", "c", "x", "--log", log)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "BROADCAST_HISTORY_TOKEN": "tok", "BROADCAST_HISTORY_LOG": log}
    server = subprocess.Popen(
        [*EXE, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"{base}/channels", headers={"Authorization": "Bearer tok"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        assert [c["name"] for c in response.json()["channels"]] == ["c"]
        assert httpx.get(f"{base}/channels").status_code == 401
        assert httpx.get(f"{base}/ui/").status_code == 200  # the console: no token
        # An open event stream is ended at the signal, not cancelled after a timeout.
        stream_url = f"{base}/channels/c/stream?since=0"
        with httpx.stream("GET", stream_url, headers={"Authorization": "Bearer tok"}) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            server.send_signal(signal.SIGINT)
            assert server.wait(timeout=20) == 0
        assert server.stderr is not None
        logged = server.stderr.read()
        assert f"operator console: {base}/ui/" in logged
        assert "Traceback" not in logged and "Exception in ASGI" not in logged, logged
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_help_without_the_admin_extra_names_it() -> None:
    # As if only broadcast-history[redis,postgres] were installed: no Typer.
    blocked = "import sys; sys.modules['typer'] = None; "
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            blocked + "from broadcast_history.cli import main; main()",
            "--help",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "pip install 'broadcast-history[admin]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["channels", "--log", "postgresql+asyncpg://localhost/app"],
        ["serve", "--allow-no-token", "--log", "postgresql+asyncpg://localhost/app"],
        ["demo", "--log", "postgresql+asyncpg://localhost/app"],
    ],
    ids=["channels", "serve", "demo"],
)
def test_a_missing_driver_is_one_error_line(args: list[str]) -> None:
    """Without asyncpg installed: a traceback ending in ModuleNotFoundError, instead
    of the line naming the extra to install."""
    hide = "import sys; sys.modules['asyncpg'] = None; "
    result = subprocess.run(
        [sys.executable, "-c", hide + EXE[2], *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "broadcast-history[postgres]" in result.stderr


def test_commands_load_no_web_framework_and_no_migration_tool() -> None:
    """FastAPI and pydantic (for two --json outputs) and Alembic (for migrating) were
    imported by every command: about 0.8 of the 2.3 s `broadcast-history --help` took."""
    program = (
        "import sys\n"
        "from broadcast_history.cli import app\n"
        "loaded = {'fastapi', 'pydantic', 'alembic'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True)


def test_logs_that_cannot_be_what_was_meant_are_refused(tmp_path: Path) -> None:
    """An in-memory log ends with the command (a publish said stored, then gone); a
    SQLite URL with two slashes named the file as a host (exit 3, with a message about
    a URL the user never wrote)."""
    for log in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"):
        refused = cli("publish", "c", "m", "--log", log, code=2)
        assert "in-memory SQLite log ends with this command" in refused.stderr
        cli("channels", "--log", log, code=2)
    refused = cli("publish", "c", "m", "--log", "sqlite+aiosqlite://events.db", code=2)
    assert "three slashes" in refused.stderr
