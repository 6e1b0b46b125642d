"""Several processes writing and flushing at once, and writers killed with SIGKILL.

Writers are real subprocesses: each records entries one transaction at a time,
prints ``ack N`` only after the commit returned, and links pending entries into the
chain every few entries, so linkers from different processes race for the head.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from requiem import settings as settings_module
from requiem.control import audit_chain
from requiem.control.audit_keys import AuditSigner
from requiem.control.audit_verify import verify_database
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory

# One interpreter imports everything once, then forks a writer process per request
# (a fresh interpreter per writer would spend most of the test importing).
# A writer prints "ack TAG N" only once entry N's transaction has committed.
ZYGOTE = """
import os, sys
import psycopg  # imported before forking, like everything else
from requiem import settings
from requiem.control import audit, audit_chain
from requiem.control.audit_keys import AuditSigner
from requiem.store.db import make_engine, session_factory

url = sys.argv[1]
config = settings.load()
signer = AuditSigner.load(config.audit_key_file)


def say(text):
    os.write(1, (text + "\\n").encode())


def write(tag, count, flush_every):
    sessions = session_factory(make_engine(config, url))
    for n in range(count):
        audit.record(sessions, "test.write", actor=tag, details={"tag": tag, "n": n})
        say(f"ack {tag} {n}")
        if n % flush_every == 0:
            audit_chain.link_pending(sessions, config, signer)
    say(f"done {tag}")


for line in sys.stdin:
    tag, count, flush_every = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            write(tag, int(count), int(flush_every))
        except BaseException as exc:
            say(f"error {tag} {exc!r}")
            os._exit(1)
        os._exit(0)
    say(f"pid {tag} {pid}")
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


class Writers:
    """A zygote process and the writer processes it forks on request."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.acked: dict[str, set[int]] = {}
        self.done: set[str] = set()
        self.errors: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            kind, tag, rest = (line.split(" ", 2) + ["", ""])[:3]
            if kind == "ack":
                self.acked.setdefault(tag, set()).add(int(rest))
            elif kind == "done":
                self.done.add(tag)
            elif kind == "error":
                self.errors.append(line)
            else:
                self.lines.put(line)

    def spawn(self, tag: str, count: int, flush_every: int) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tag} {count} {flush_every}\n".encode())
        self.proc.stdin.flush()
        line = self.lines.get(timeout=60)
        assert line.startswith(f"pid {tag} "), line
        return int(line.split()[2])

    def wait_until(self, predicate, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and not self.errors:
            assert time.monotonic() < deadline, "writers did not finish"
            time.sleep(0.02)
        assert not self.errors, self.errors

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)


def prepare(url: str):
    engine = make_engine(settings_module.load(), url)
    ensure_schema(engine)
    sessions = session_factory(engine)
    with sessions() as session, session.begin():
        session.execute(text("DELETE FROM audit_pending"))
    return sessions


def chained_pairs(sessions) -> list[tuple[str, int]]:
    """(writer tag, entry number) of every chained entry, in chain order."""
    with sessions() as session:
        rows = session.execute(
            text("SELECT actor, details FROM audit_entries ORDER BY seq")
        ).all()
    return [(row[0], json.loads(row[1])["n"]) for row in rows]


def finish(sessions) -> None:
    config = settings_module.load()
    audit_chain.link_pending(sessions, config, AuditSigner.load(config.audit_key_file))


def test_concurrent_writers_make_one_chain_without_gaps(database_url: str):
    """4 processes × 25 entries, all linking: seq 1..100, each entry exactly once."""
    sessions = prepare(database_url)
    writers = Writers(database_url)

    for i in range(4):
        writers.spawn(f"w{i}", 25, 3)
    writers.wait_until(lambda: len(writers.done) == 4)
    writers.close()

    finish(sessions)
    pairs = chained_pairs(sessions)
    assert sorted(pairs) == sorted((f"w{i}", n) for i in range(4) for n in range(25))
    report = verify_database(sessions, None)
    assert (report.checked, report.head_seq) == (100, 100)


@pytest.mark.parametrize(("backend", "kills"), [("sqlite", 9), ("postgresql", 6)])
def test_kill_9_loses_no_acknowledged_entry_and_corrupts_nothing(
    backend: str, kills: int, home: Path, request: pytest.FixtureRequest
):
    """Writers SIGKILLed at random moments, mid-record or mid-flush, many times."""
    if backend == "sqlite":
        url = f"sqlite:///{home / 'requiem.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    sessions = prepare(url)
    chance = random.Random(7)
    writers = Writers(url)

    for round_no in range(kills // 3):
        tags = [f"r{round_no}w{i}" for i in range(3)]
        pids = [writers.spawn(tag, 100_000, 2) for tag in tags]
        for tag, pid in zip(tags, pids, strict=True):
            writers.wait_until(lambda tag=tag: tag in writers.acked)
            time.sleep(chance.uniform(0.0, 0.2))
            os.kill(pid, signal.SIGKILL)
    writers.close()

    assert not writers.errors and not writers.done
    finish(sessions)
    pairs = chained_pairs(sessions)
    assert len(pairs) == len(set(pairs))
    assert verify_database(sessions, None).checked == len(pairs)
    present = set(pairs)
    acked = {(tag, n) for tag, numbers in writers.acked.items() for n in numbers}
    assert len(acked) >= kills
    assert acked <= present
