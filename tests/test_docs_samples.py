"""Every ```python block in docs/ runs, and the site builds with ``mkdocs build --strict``.

Samples must be self-contained and run on the memory transport and SQLite. A block
that needs a service says so in a comment among its first lines::

    # requires: redis, postgres

Such a block runs only where the service is reachable (under ``CI=true`` a missing
Redis, Postgres or MySQL fails, as everywhere in this suite). Samples name the usual
local addresses; the test points them at ``BH_TEST_REDIS``, ``BH_TEST_POSTGRES`` and
``BH_TEST_MYSQL`` when those are set. Kafka samples run against a broker on 9092
(tansu is started there if none). NATS samples (``nats://127.0.0.1:4222``) and Redis
Cluster samples (``redis-cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003``) run
against the session's servers of ``tests/conftest.py``.
Blocks in other languages (``bash``, ``text``, ``diff``...) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import (
    MYSQL_URL,
    POSTGRES_URL,
    REDIS_URL,
    require_mysql,
    require_postgres,
    require_redis,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_REQUIRES = re.compile(r"^#\s*requires:\s*(?P<names>.+)$", re.MULTILINE)
SERVICES = {"redis", "postgres", "kafka", "mysql", "nats", "redis-cluster"}
# The addresses samples write for services the session starts on free ports.
SAMPLE_NATS = "nats://127.0.0.1:4222"
SAMPLE_KAFKA = re.compile(r"kafka://(?:localhost|127\.0\.0\.1):9092")
SAMPLE_REDIS_CLUSTER = "redis-cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
# The addresses samples write, and the test services they stand for.
_DEFAULT_URLS = {
    "redis://127.0.0.1:6379/0": REDIS_URL,
    "postgresql://postgres@127.0.0.1:5432/test": POSTGRES_URL,
    "postgresql+asyncpg://postgres@127.0.0.1:5432/test": POSTGRES_URL.replace(
        "postgresql://", "postgresql+asyncpg://", 1
    ),
    "mysql+asyncmy://root@127.0.0.1:3306/test": MYSQL_URL,
}


def localize(source: str) -> str:
    """Point the usual local service URLs of a sample at this run's test services."""
    for written, actual in _DEFAULT_URLS.items():
        source = source.replace(written, actual)
    return source


class Sample(NamedTuple):
    path: Path
    line: int
    source: str
    requires: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(DOCS)}:{self.line}"


def collect() -> list[Sample]:
    samples = []
    for path in sorted(DOCS.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            body = textwrap.dedent(match["body"])
            line = text.count("\n", 0, match.start("body")) + 1
            head = "\n".join(body.splitlines()[:5])
            requires: set[str] = set()
            for found in _REQUIRES.finditer(head):
                requires.update(n.strip() for n in found["names"].split(",") if n.strip())
            samples.append(Sample(path, line, body, frozenset(requires)))
    return samples


SAMPLES = collect()


def test_samples_were_found() -> None:
    assert len(SAMPLES) >= 10
    for sample in SAMPLES:
        unknown = sample.requires - SERVICES
        assert not unknown, f"{sample.id}: unknown requirement {sorted(unknown)}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_doc_sample_runs(
    sample: Sample,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if "redis" in sample.requires:
        require_redis()
    if "postgres" in sample.requires:
        require_postgres()
    if "mysql" in sample.requires:
        require_mysql()
    source = localize(sample.source)
    if "kafka" in sample.requires:
        # The session's broker, on a free port: Kafka's usual one may be taken, and
        # two test workers must not share a broker one of them stops.
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        source, found = SAMPLE_KAFKA.subn(f"kafka://{bootstrap}", source)
        assert found, f"{sample.id}: no {SAMPLE_KAFKA.pattern} to point at the test broker"
    if "nats" in sample.requires:
        pytest.importorskip("nats", reason="nats-py is not installed (the nats extra)")
        source = source.replace(SAMPLE_NATS, request.getfixturevalue("nats_url"))
    if "redis-cluster" in sample.requires:
        url = request.getfixturevalue("redis_cluster_url")
        source = source.replace(SAMPLE_REDIS_CLUSTER, url)
    # Files the sample creates (SQLite logs) go to a fresh directory.
    monkeypatch.chdir(tmp_path)
    # Blank lines in front keep tracebacks pointing at the line in the .md file.
    code = compile("\n" * (sample.line - 1) + source, str(sample.path), "exec")
    exec(code, {"__name__": "docs_sample"})


def nav_pages() -> list[str]:
    """Pages named in mkdocs.yml's nav (read as text: the file holds Python tags)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    return re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", text, re.MULTILINE)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra)")
    pytest.importorskip("material", reason="mkdocs-material is not installed (the docs extra)")
    # Pages other issues write may not exist yet: build a copy with stubs for them, so
    # everything else is still checked strictly, and say so instead of passing.
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    missing = [page for page in nav_pages() if not (DOCS / page).exists()]
    for page in missing:
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text("# Not written yet\n", encoding="utf-8")
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    (tmp_path / "mkdocs.yml").write_text(config, encoding="utf-8")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "concepts" / "index.html").exists()
    if missing:
        pytest.skip(f"built strictly, but with stubs for pages not written yet: {missing}")
