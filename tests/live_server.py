"""A real ``requiem serve`` on a free 127.0.0.1 port, for the API tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a test server and its CLI calls share (REQUIEM_* replaced)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("REQUIEM_") and not k.startswith("REQUIEM_TEST_"))
        and k != "DATABASE_URL"
    }
    env.update(
        REQUIEM_HOME=str(home),
        REQUIEM_WORK_DIR=str(home / "work"),
        REQUIEM_LOG_LEVEL="warning",
        **extra,
    )
    return env


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    env: dict[str, str]
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)
        return self.process.returncode


def start(home: Path, **extra: str) -> Server:
    """Start ``requiem serve`` as a subprocess and wait until it answers."""
    port = free_port()
    env = server_env(home, **extra)
    log_path = home / f"serve-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "requiem", "serve", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", env, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited at startup:\n{server.log()}")
        try:
            httpx.get(f"{server.url}/api/health", timeout=1)
            return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(
        f"server did not answer in {STARTUP_TIMEOUT_S} s:\n{server.log()}"
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run the real ``requiem`` command with ``env``; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "requiem", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def new_key(env: dict[str, str], tenant: str, role: str, *, operator: bool = False):
    """Create ``tenant`` (if new) and a key for it through the CLI; the key text."""
    created = cli(
        env, "tenant", "create", tenant, *(["--operator"] if operator else [])
    )
    assert created.returncode in (0, 8), created.stderr
    made = cli(
        env,
        "api-key",
        "generate",
        "--tenant",
        tenant,
        "--role",
        role,
        "--name",
        f"{tenant}-{role}",
    )
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()
