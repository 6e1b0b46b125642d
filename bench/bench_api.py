"""Load on a local ``requiem serve``: requests/s and latency at 1, 8 and 64 clients.

Starts a server on a free 127.0.0.1 port with a private REQUIEM_HOME (or uses
``--url`` with ``--key``), then for each scenario — health, a cached execution, a CAS
get — runs N concurrent clients for ``--duration`` seconds and prints requests/s,
p50 and p99. It also samples the server's resident memory during the 64-client runs
and reports its growth from the first to the last scenario. Bounded in time and
count; loopback only.

Goals on the 2-core reference machine: health ≥ 5,000 req/s; cached execution ≥
1,500 req/s with p99 ≤ 20 ms at 8 clients; RSS < 300 MiB at 64 clients. Numbers are
printed, never asserted.

The load generator is a small asyncio HTTP/1.1 keep-alive client rather than httpx:
client and server share two cores, and httpx's per-request cost (several times the
server's for ``/api/health``) would measure the client instead of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_REQUESTS_PER_CLIENT = 200_000


@dataclass
class Scenario:
    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    scenario: str
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms) or [0.0]

        def pct(p: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

        return {
            "scenario": self.scenario,
            "clients": self.clients,
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.requests / self.seconds, 1),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
        }


def _request_bytes(scenario: Scenario, host: str) -> bytes:
    lines = [f"{scenario.method} {scenario.path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in scenario.headers.items()]
    lines.append(f"Content-Length: {len(scenario.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + scenario.body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Status of one response; its body is read and dropped (Content-Length only)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _client(
    host: str, port: int, payload: bytes, deadline: float, outcome: Outcome
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(MAX_REQUESTS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                break
            started = time.perf_counter()
            writer.write(payload)
            status = await _read_response(reader)
            outcome.latencies_ms.append((time.perf_counter() - started) * 1000)
            outcome.requests += 1
            if status >= 400:
                outcome.errors += 1
    finally:
        writer.close()


async def _load(
    host: str, port: int, scenario: Scenario, clients: int, seconds: float
) -> Outcome:
    outcome = Outcome(scenario.name, clients, 0, 0, seconds, [])
    payload = _request_bytes(scenario, f"{host}:{port}")
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(_client(host, port, payload, deadline, outcome) for _ in range(clients))
    )
    outcome.seconds = time.perf_counter() - started
    return outcome


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    home: Path, port: int, log_level: str, database_url: str | None
) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REQUIEM_")}
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(
        REQUIEM_HOME=str(home),
        REQUIEM_WORK_DIR=str(home / "work"),
        REQUIEM_LOG_LEVEL=log_level,
        REQUIEM_QUEUE_TIMEOUT_MS="10000",
    )
    os.environ.update(env)
    log = open(home / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "requiem", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    import httpx

    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"server did not start; see {home / 'serve.log'}")


def make_key(home: Path) -> str:
    from requiem import settings
    from requiem.control import credentials, tenants
    from requiem.store.bootstrap import ensure_schema
    from requiem.store.db import make_engine, session_factory, transaction

    config = settings.load()
    engine = make_engine(config)
    ensure_schema(engine)
    with transaction(session_factory(engine)) as session:
        tenants.create(session, "bench", actor="bench")
    with transaction(session_factory(engine)) as session:
        key, _ = credentials.generate(
            session, config.secret_key, tenant="bench", role="operator", name="bench"
        )
    engine.dispose()
    return key


def prepare(url: str, key: str) -> list[Scenario]:
    """Upload a blob and run the execution once so later runs are cache hits."""
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
        digest = client.put("/api/v1/cas", content=b"bench bytes\n" * 64).json()[
            "digest"
        ]
        request = json.dumps(
            {"command": "/bin/cat", "argv": ["in"], "inputs": {"in": digest}}
        ).encode()
        first = client.post("/api/v1/executions", content=request)
        first.raise_for_status()
    json_auth = {**auth, "Content-Type": "application/json"}
    return [
        Scenario("health", "GET", "/api/health"),
        Scenario("cached_execution", "POST", "/api/v1/executions", request, json_auth),
        Scenario("cas_get", "GET", f"/api/v1/cas/{digest}", headers=auth),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    parser.add_argument("--clients", default="1,8,64", help="comma-separated")
    parser.add_argument("--url", help="use this running server instead of one's own")
    parser.add_argument("--key", help="operator key for --url")
    parser.add_argument("--log-level", default="info", help="server log level")
    parser.add_argument(
        "--database-url", help="an empty database for the server (default: SQLite)"
    )
    parser.add_argument("--quick", action="store_true", help="1 s runs")
    parser.add_argument("--json", action="store_true", help="JSON on stdout")
    args = parser.parse_args()
    duration = 1.0 if args.quick else args.duration
    counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="requiem-bench-api-") as tmp:
        process = None
        if args.url:
            url, key = args.url.rstrip("/"), args.key or ""
        else:
            port = free_port()
            process = start_server(Path(tmp), port, args.log_level, args.database_url)
            url, key = f"http://127.0.0.1:{port}", make_key(Path(tmp))
        host, port_text = url.removeprefix("http://").split(":")
        try:
            scenarios = prepare(url, key)
            rss_start = rss_mib(process.pid) if process else None
            results, rss_at_64 = [], 0.0
            for scenario in scenarios:
                for clients in counts:
                    outcome = asyncio.run(
                        _load(host, int(port_text), scenario, clients, duration)
                    )
                    results.append(outcome.summary())
                    if process and clients >= 64:
                        rss_at_64 = max(rss_at_64, rss_mib(process.pid))
            rss_end = rss_mib(process.pid) if process else None
        finally:
            if process:
                process.send_signal(signal.SIGTERM)
                process.wait(60)

    report = {
        "duration_s": duration,
        "log_level": args.log_level,
        "database": "postgresql" if args.database_url else "sqlite",
        "results": results,
        "rss_mib_start": round(rss_start, 1) if rss_start else None,
        "rss_mib_max_at_64_clients": round(rss_at_64, 1) if process else None,
        "rss_mib_end": round(rss_end, 1) if rss_end else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{'scenario':<18}{'clients':>8}{'requests':>10}{'errors':>8}"
        f"{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    )
    for row in results:
        print(
            f"{row['scenario']:<18}{row['clients']:>8}{row['requests']:>10}"
            f"{row['errors']:>8}{row['rps']:>10}{row['p50_ms']:>9}{row['p99_ms']:>9}"
        )
    if process:
        print(
            f"server RSS: start {report['rss_mib_start']} MiB, "
            f"max at 64 clients {report['rss_mib_max_at_64_clients']} MiB, "
            f"end {report['rss_mib_end']} MiB (log level {args.log_level})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
