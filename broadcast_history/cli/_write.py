"""Changing commands: ``publish``, ``trim``, ``delete``, ``export``, ``import``."""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn

from ..admin import ImportResult, event_json
from ..admin._import import max_line_length, split_lines
from ._app import app, console, err_console, fail, open_admin, open_broadcast, parse_time, run
from ._options import DEFAULT_LOG, DEFAULT_URL, JsonOption, LogOption, UrlOption


@app.command()
def publish(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    message: Annotated[str, typer.Argument(help="The message ('-': read it from stdin).")],
    key: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    binary: Annotated[
        bool, typer.Option("--base64", help="MESSAGE is base64: publish the decoded bytes.")
    ] = False,
    as_json: JsonOption = False,
    log: LogOption = DEFAULT_LOG,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Publish one message (stored in the log, then sent live)."""
    text = sys.stdin.read() if message == "-" else message
    payload: str | bytes = text
    if binary:
        try:
            payload = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            fail("--base64: MESSAGE is not valid base64", 2)

    async def go() -> None:
        async with open_broadcast(url, log) as broadcast:
            stored = await broadcast.publish(channel, payload, key=key)
        if as_json:
            typer.echo(json.dumps(event_json(stored), ensure_ascii=False))
        else:
            when = stored.timestamp.isoformat() if stored.timestamp else ""
            console.print(
                f"published {escape(repr(channel))} #{stored.offset} (epoch {stored.epoch}, {when})"
            )

    run(go())


@app.command()
def trim(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    before: Annotated[int | None, typer.Option(min=0, help="Remove offsets below this.")] = None,
    before_time: Annotated[
        str | None, typer.Option(help="Remove events older than this ISO 8601 time.")
    ] = None,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Remove a channel's old events (by offset and/or time)."""
    moment = parse_time(before_time, "--before-time")
    if before is None and moment is None:
        fail("give --before OFFSET and/or --before-time TIME", 2)

    async def go() -> None:
        async with open_admin(log) as admin:
            removed = await admin.trim(channel, before=before, before_time=moment)
            stats = await admin.channel(channel)
        console.print(
            f"removed {removed} events of {escape(repr(channel))}; "
            f"stored now: {stats.first_offset}..{stats.last_offset} ({stats.count})"
        )

    run(go())


@app.command()
def delete(
    channel: Annotated[str, typer.Argument(help="The channel.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Delete a channel and its whole history (its next use starts a new epoch)."""

    async def count() -> int:
        async with open_admin(log) as admin:
            return (await admin.channel(channel)).count

    stored = run(count())
    if not yes:
        typer.confirm(
            f"Delete channel {channel!r} and its {stored} stored events?", abort=True, err=True
        )

    async def go() -> None:
        async with open_admin(log) as admin:
            await admin.delete(channel)
        console.print(f"deleted {escape(repr(channel))}")

    run(go())


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
    )


@app.command("export")
def export_(
    names: Annotated[
        list[str] | None, typer.Argument(help="Channels to export (default: all).")
    ] = None,
    prefix: Annotated[str | None, typer.Option(help="Only channels starting with it.")] = None,
    output: Annotated[
        str, typer.Option("--output", "-o", help="File to write ('-': stdout).")
    ] = "-",
    log: LogOption = DEFAULT_LOG,
) -> None:
    """Write channels and their events as JSON lines (re-importable with `import`)."""
    if names:
        names = list(dict.fromkeys(names))  # twice, a channel would make the file refused

    async def go(out: IO[str], progress: Progress | None) -> int:
        async with open_admin(log) as admin:
            if names:
                total = sum([(await admin.channel(name)).count for name in names])
            else:
                total = sum([s.count async for s in admin.all_channels(prefix=prefix)])
            advance = None
            if progress is not None:
                advance = partial(progress.advance, progress.add_task("exporting", total=total))
            return await _write(admin.export_jsonl(names or None, prefix=prefix), out, advance)

    if output == "-":
        with _written(output):
            run(go(sys.stdout, None))
        return
    # Through a symbolic link: the file it points to is the one written.
    target = Path(output).resolve()
    if target.exists() and not target.is_file():  # a device (/dev/null), a FIFO
        with _written(output), _opened(target.open, output) as out, _progress() as progress:
            written = run(go(out, progress))
    else:
        # Written beside it and renamed at the end: an export that fails (a channel
        # or --log mistyped in a backup job) leaves the file there before untouched;
        # opening it for writing first emptied it.
        made = partial(
            tempfile.NamedTemporaryFile,
            dir=target.parent,
            prefix=f".{target.name}.",
            suffix=".part",
            delete=False,
        )
        with _written(output), _opened(made, output) as out:
            try:
                with _progress() as progress:
                    written = run(go(out, progress))
                # On disk before it takes the name: a crash or power loss after the
                # rename must not leave a backup that was reported written empty.
                out.flush()
                os.fsync(out.fileno())
                out.close()
                # The temporary file is private (0600): give it the mode the file had,
                # or the one a new file gets.
                os.chmod(out.name, _mode_of(target))
                os.replace(out.name, target)
                _sync_directory(target.parent)  # the rename itself
            except BaseException:
                Path(out.name).unlink(missing_ok=True)
                raise
    err_console.print(f"exported {written} events to {escape(output)}")


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform whose directories cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that does not sync directories
        pass
    finally:
        os.close(fd)


def _mode_of(target: Path) -> int:
    if target.exists():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Channels an import names in its report.
_NAMED = 10


@contextmanager
def _written(output: str) -> Iterator[None]:
    """A write that failed (a full disk) as a one-line error, exit code 1; a reader
    that went away (``export | head``) ends the command as before."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}", 1)


@contextmanager
def _opened(opener: Callable[..., IO[str]], output: str) -> Iterator[IO[str]]:
    """``opener("w", encoding="utf-8")``, failing as a one-line error (exit code 2)."""
    try:
        out = opener(mode="w", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}", 2)
    with out:
        yield out


async def _write(
    lines: AsyncIterator[str], out: IO[str], on_event: Callable[[], object] | None
) -> int:
    written = 0
    async for line in lines:
        out.write(line)
        if line.startswith('{"type":"event"'):
            written += 1
            if on_event is not None:
                on_event()
    out.flush()
    return written


def _read_chunks(source: IO[bytes], advance: Callable[[int], object] | None) -> Iterator[bytes]:
    # Chunks, not lines: a line without an end must not be read into memory whole.
    while chunk := source.read(1 << 16):
        if advance is not None:
            advance(len(chunk))
        yield chunk


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="JSON-lines file from `export` ('-': stdin).")],
    log: LogOption = DEFAULT_LOG,
    new_epoch: Annotated[
        bool,
        typer.Option(
            "--new-epoch",
            help="Give each channel a new epoch (restoring a backup older than what "
            "clients have seen: their positions then raise StreamReset).",
        ),
    ] = False,
) -> None:
    """Load an export into the log, all or nothing; fails if a channel already exists."""

    async def go(chunks: Iterator[bytes]) -> ImportResult:
        async with open_admin(log, must_exist=False) as admin:
            lines = split_lines(chunks, max_line_length(admin.max_message_size))
            return await admin.import_jsonl(lines, new_epoch=new_epoch)

    if source == "-":
        result = run(go(_read_chunks(sys.stdin.buffer, None)))
    else:
        path = Path(source)
        # Pipes and devices too: `import <(zcat backup.jsonl.gz)` reads /dev/fd/63.
        if not path.exists():
            fail(f"no such file: {source}", 2)
        if path.is_dir():
            fail(f"{source} is a directory", 2)
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
        try:
            file = path.open("rb")
        except OSError as exc:
            fail(f"cannot read {source}: {exc.strerror or exc}", 2)
        with file, Progress(*columns, console=err_console, transient=True) as progress:
            size = path.stat().st_size if path.is_file() else None
            task = progress.add_task("importing", total=size)
            result = run(go(_read_chunks(file, lambda n: progress.advance(task, n))))
    events, channels = result.events, len(result.channels)
    # The first few names: an import of a whole log made one line of megabytes.
    named = ", ".join(repr(name) for name in result.channels[:_NAMED])
    if channels > _NAMED:
        named += f" and {channels - _NAMED} more"
    err_console.print(
        f"imported {events} event{'' if events == 1 else 's'} in {channels} "
        f"channel{'' if channels == 1 else 's'}" + (f": {escape(named)}" if channels else "")
    )
