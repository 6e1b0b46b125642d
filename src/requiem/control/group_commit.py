"""Group commit: many callers' writes in one transaction, one fsync for all of them.

Every execution ends in a small transaction (execution row, cost record, ownership,
audit entry). With SQLite at ``synchronous=FULL`` — and with PostgreSQL's WAL flush
— the commit's fsync, not the statements, is what a caller waits for. A single
writer thread takes every write queued while the previous commit was running and
commits them together; each caller still returns only after its own write is
durable, so nothing is acknowledged early. If a batch fails, its writes are retried
one by one so one bad write cannot sink the others.

SQLAlchemy has no such batching of independent callers, hence this module.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from requiem import log
from requiem.store.db import transaction

logger = log.get("requiem.control.group_commit")

T = TypeVar("T")
MAX_BATCH = 64
_STOP = object()


class GroupCommitter:
    """Queue writes; a single thread commits whatever has gathered, in one go."""

    def __init__(self, sessions: sessionmaker[Session], max_batch: int = MAX_BATCH):
        self._sessions = sessions
        self._max_batch = max_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def write(self, work: Callable[[Session], T]) -> T:
        """Run ``work(session)`` in a shared transaction; return once it committed."""
        self._ensure_thread()
        future: Future[T] = Future()
        self._queue.put((work, future))
        return future.result()

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="requiem-group-commit", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[[Session], Any], Future]]) -> None:
        try:
            with transaction(self._sessions) as session:
                results = [work(session) for work, _ in batch]
        except Exception:  # noqa: BLE001 - retried one by one below
            if len(batch) > 1:
                logger.warning("group_commit_batch_failed", size=len(batch))
            for work, future in batch:
                try:
                    with transaction(self._sessions) as session:
                        result = work(session)
                except Exception as exc:  # noqa: BLE001 - handed to its caller
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
