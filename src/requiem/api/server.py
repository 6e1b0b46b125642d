"""``requiem serve``: uvicorn with the shutdown the runbook expects.

On the first SIGTERM (or SIGINT) a process marks itself draining — readiness answers
503 at once and new requests get 503 ``shutting_down`` — while it keeps accepting
connections (so clients get that answer, not a refused connection) until the
in-flight requests and executions are done or ``REQUIEM_SHUTDOWN_GRACE_S`` is over;
then it stops accepting, runs the app's shutdown (audit flush, pool drain) and
exits 0. A second signal, or the end of the grace period, kills the
children still running (the executions' processes) so the exit is not held up.

The socket is bound before anything is announced: a busy port is one line,
``address_in_use`` (exit 6), never a "serving on" followed by uvicorn's error.

With ``--workers N`` a small supervisor binds the socket once and runs N worker
processes that share it; it forwards signals to them and exits once they have.
uvicorn's own supervisor builds a plain ``uvicorn.Server`` in each worker, which
would lose this shutdown behaviour, hence the few lines here.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn

from requiem import log
from requiem.api.service import SHUTDOWN, busy
from requiem.errors import Unavailable

logger = log.get("requiem.serve")

APP = "requiem.api.app:app_from_environment"
PROCESS_NAME = b"requiem"
PR_SET_NAME = 15
RESERVED_FDS = 256
IDLE_POLL_S = 0.05
LISTEN_BACKLOG = 2048


class AddressInUse(Unavailable):
    code = "address_in_use"


class CannotBind(Unavailable):
    code = "cannot_bind"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ``address_in_use`` when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            msg = f"{where} is already in use; stop what holds it or choose --port"
            raise AddressInUse(msg, host=host, port=port) from None
        msg = f"cannot listen on {where}: {exc.strerror or exc}"
        raise CannotBind(msg, host=host, port=port) from None
    sock.set_inheritable(True)
    return sock


def name_process() -> None:
    """Make ``ps`` and ``pkill requiem`` see this process as ``requiem``."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)
    except (OSError, AttributeError):
        logger.warning("process_name_unchanged")


def child_pids() -> list[int]:
    """Direct children of this process, from every thread's /proc children list."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(pid) for pid in text.split())
    return sorted(pids)


def kill_children() -> None:
    """SIGKILL every child and, where a child leads its own group, that group."""
    for pid in child_pids():
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        logger.warning("child_killed_at_shutdown", pid=pid)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining on the first signal and forcing on the second."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._deadline: threading.Timer | None = None
        self._signalled = False

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        name_process()
        # uvicorn re-raises the caught signal once it has shut down; with these
        # handlers in place that re-raise is a no-op and the process exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        super().run(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            logger.warning("second_signal_forcing_exit", signal=sig)
            self.force_exit = True
            self.should_exit = True
            kill_children()
            return
        self._signalled = True
        logger.info("draining", signal=sig, grace_s=self.grace_s)
        SHUTDOWN.set()
        self._deadline = threading.Timer(self.grace_s, self._grace_over)
        self._deadline.daemon = True
        self._deadline.start()
        threading.Thread(
            target=self._exit_when_idle, name="requiem-drain", daemon=True
        ).start()

    def _exit_when_idle(self) -> None:
        """Keep answering (503 ``shutting_down``) until in-flight work is done."""
        deadline = time.monotonic() + self.grace_s
        while busy() and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_S)
        self.should_exit = True

    def _grace_over(self) -> None:
        logger.warning("grace_period_over", grace_s=self.grace_s)
        kill_children()


def connection_limit() -> int:
    """Connections one process accepts: most of its file descriptors, never all.

    The soft descriptor limit is first raised to the hard one. Beyond the returned
    number uvicorn answers 503 at once instead of accepting, so a flood of
    connections cannot exhaust the descriptors the database, the CAS and the
    executions need.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(64, int(soft * 0.75) - RESERVED_FDS)


def _config(host: str, port: int, grace_s: float, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        APP,
        factory=True,
        host=host,
        port=port,
        access_log=False,
        log_level="warning" if log_level == "info" else log_level,
        timeout_graceful_shutdown=grace_s,
        lifespan="on",
        server_header=False,
        limit_concurrency=connection_limit(),
    )


def serve(sock: socket.socket, workers: int, grace_s: float, log_level: str) -> int:
    """Serve on ``sock`` (from :func:`bind`) until a signal ends it; the exit code."""
    name_process()
    host, port = sock.getsockname()[:2]
    config = _config(host, port, grace_s, log_level)
    if workers <= 1:
        server = GracefulServer(config, grace_s)
        server.run(sockets=[sock])
        sock.close()
        return 0 if server.started else 3

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker,
            args=(host, port, grace_s, log_level, sock),
            name=f"requiem-worker-{n}",
        )
        for n in range(workers)
    ]

    def forward(sig: int, _frame: FrameType | None) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.start()
    logger.info("workers_started", workers=workers, host=host, port=port)
    for process in processes:
        process.join()
    sock.close()
    # A worker stopped by the signal before it installed its handlers is not a failure.
    failed = [
        p.exitcode for p in processes if p.exitcode not in (0, None, -signal.SIGTERM)
    ]
    return 0 if not failed else 1


def _worker(
    host: str, port: int, grace_s: float, log_level: str, sock: socket.socket
) -> None:
    from requiem import settings

    log.configure(log_level, str(settings.load().get("REQUIEM_LOG_FORMAT")))
    server = GracefulServer(_config(host, port, grace_s, log_level), grace_s)
    server.run(sockets=[sock])
