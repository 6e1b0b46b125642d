"""The executions service: admit, run, record, read back, replay — per tenant.

One execution end to end: flags (``execution_pause``) → tenant active → within
budget → inputs owned by the tenant → engine run → one transaction writing the
execution row, its cost record, the tenant's ownership of every blob it produced
and an audit entry carrying the request and result digests. Every blob the
execution references is pinned in the CAS for the tenant so ``cas gc`` keeps it.

Reads are always scoped to the caller's tenant: another tenant's execution id
answers ``execution_not_found`` exactly as an id that never existed.

Cost: ``units`` is the run's duration in seconds; ``cost`` is units times
``REQUIEM_COST_PER_SECOND``. A cache hit costs nothing (no process ran).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from requiem import digest as dg
from requiem.cas.store import LocalCAS
from requiem.control import audit
from requiem.control.credentials import Principal
from requiem.control.group_commit import GroupCommitter
from requiem.control.tenants import require_active
from requiem.engine import ExecutionRequest, ExecutionResult, ReplayReport
from requiem.engine.errors import MissingInput, SandboxUnavailable
from requiem.errors import Forbidden, InvalidInput, NotFound, TooManyRequests
from requiem.store.models import (
    Budget,
    CasOwnership,
    CostRecord,
    Execution,
    new_id,
    utcnow,
)

STATUSES = ("succeeded", "failed", "error")
MAX_PAGE = 200
SANDBOX_PROBE_TTL_S = 5.0


class ExecutionNotFound(NotFound):
    code = "execution_not_found"


class RefusedOverHttp(InvalidInput):
    code = "refused_over_http"


class TenantMismatch(Forbidden):
    code = "tenant_mismatch"


class QuotaExceeded(TooManyRequests):
    code = "quota_exceeded"


class InvalidCursor(InvalidInput):
    code = "invalid_cursor"


class RunsRequests(Protocol):
    def run(self, request: ExecutionRequest, use_cache: bool = True) -> Any: ...

    def replay(self, result: ExecutionResult) -> ReplayReport: ...

    def capabilities(self) -> Any: ...


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def outcome_of(result: ExecutionResult) -> str:
    """succeeded (ok), failed (ran and exited non-zero) or error (error_code)."""
    if result.ok:
        return "succeeded"
    return "error" if result.error_code else "failed"


def refuse_host_fields(request: ExecutionRequest, *, trusted: bool = False) -> None:
    """Refuse what would let a remote caller reach the server's own files or network.

    ``workspace_root`` and ``policy.ro_paths`` name paths on the server's disk and
    are refused for everyone. Running without the sandbox, or with the host's
    network, would let a command read the database, the audit signing key or
    services on the loopback; only operator tenants (``trusted``) may ask for it.
    """
    if request.workspace_root is not None:
        msg = "workspace_root is refused over HTTP: send inputs as CAS digests"
        raise RefusedOverHttp(msg, field="workspace_root")
    if request.policy.ro_paths:
        msg = "policy.ro_paths is refused over HTTP: it exposes the server's files"
        raise RefusedOverHttp(msg, field="policy.ro_paths")
    if trusted:
        return
    if not request.policy.sandbox:
        msg = "policy.sandbox=false is refused over HTTP except for operator tenants"
        raise RefusedOverHttp(msg, field="policy.sandbox")
    if request.policy.network == "host":
        msg = "policy.network=host is refused over HTTP except for operator tenants"
        raise RefusedOverHttp(msg, field="policy.network")


class ExecutionService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        cas: LocalCAS,
        engine: RunsRequests,
        cost_per_second: Decimal,
        writer: GroupCommitter | None = None,
    ) -> None:
        self.sessions = sessions
        self.writer = writer or GroupCommitter(sessions)
        self._sandbox_ok = False
        self._sandbox_probed_at = float("-inf")
        self.cas = cas
        self.engine = engine
        self.cost_per_second = cost_per_second

    # -- admission ---------------------------------------------------------------

    def admit(
        self, principal: Principal, request: ExecutionRequest
    ) -> ExecutionRequest:
        """The request as it will run for this tenant, or the reason it may not."""
        refuse_host_fields(request, trusted=principal.is_operator)
        if not principal.is_operator and not self._sandbox_works():
            msg = "the sandbox is not working on this server; executions are refused"
            raise SandboxUnavailable(msg)
        if request.tenant_id not in (None, principal.tenant_id):
            msg = "tenant_id in the request does not match the API key's tenant"
            raise TenantMismatch(msg)

        with self.sessions() as session:
            self._check_tenant(session, principal)
            self._check_inputs(session, principal.tenant_id, request.inputs.values())

        return request.model_copy(update={"tenant_id": principal.tenant_id})

    def _sandbox_works(self) -> bool:
        """Whether bubblewrap works, probed at most every SANDBOX_PROBE_TTL_S."""
        now = time.monotonic()
        if now - self._sandbox_probed_at >= SANDBOX_PROBE_TTL_S:
            self._sandbox_ok = bool(self.engine.capabilities().bwrap_works)
            self._sandbox_probed_at = now
        return self._sandbox_ok

    def _check_tenant(self, session: Session, principal: Principal) -> None:
        """The tenant exists, is active and has budget left."""
        tenant = require_active(session, principal.tenant_id)
        self._check_budget(session, tenant.id)

    def _check_budget(self, session: Session, tenant_id: str) -> None:
        budget = session.get(Budget, tenant_id)
        if budget is None:
            return
        since = period_start(budget.period, utcnow())
        spent = session.scalar(
            select(func.coalesce(func.sum(CostRecord.cost), 0)).where(
                CostRecord.tenant_id == tenant_id, CostRecord.created_at >= since
            )
        )
        if Decimal(spent) >= budget.limit_amount:
            msg = (
                f"tenant {tenant_id} has spent {Decimal(spent):f} of its "
                f"{budget.limit_amount:f} budget this {budget.period}"
            )
            raise QuotaExceeded(msg, retry_after_s=3600)

    def _check_inputs(
        self, session: Session, tenant_id: str, digests: Iterable[str]
    ) -> None:
        wanted = set(digests)
        if not wanted:
            return
        owned = set(
            session.scalars(
                select(CasOwnership.digest).where(
                    CasOwnership.tenant_id == tenant_id,
                    CasOwnership.digest.in_(wanted),
                )
            )
        )
        missing = sorted(wanted - owned)
        if missing:
            msg = f"input {missing[0]} is not in this tenant's CAS"
            raise MissingInput(msg, digest=missing[0])

    # -- running -----------------------------------------------------------------

    def run(
        self,
        principal: Principal,
        request: ExecutionRequest,
        *,
        request_id: str | None,
        replay_of: str | None = None,
    ) -> tuple[dict[str, Any], ExecutionResult]:
        """Run an admitted request and record it; the execution document."""
        started = utcnow()
        result: ExecutionResult = self.engine.run(request, use_cache=True)
        finished = utcnow()
        document = self._record(
            principal, result, started, finished, request_id, replay_of
        )
        return document, result

    def replay(
        self, principal: Principal, execution_id: str, *, request_id: str | None
    ) -> tuple[dict[str, Any], ReplayReport]:
        """Run a recorded execution again and compare every reproducible field."""
        with self.sessions() as session:
            row = self._row(session, principal.tenant_id, execution_id)
            self._check_tenant(session, principal)
        if row.result_blob is None:
            msg = f"execution {execution_id} has no stored result to replay"
            raise ExecutionNotFound(msg, execution_id=execution_id)
        original = load_result(self.cas, row.result_blob)

        started = utcnow()
        report = self.engine.replay(original)
        finished = utcnow()

        document = self._record(
            principal,
            report.replayed,
            started,
            finished,
            request_id,
            replay_of=execution_id,
            replay_ok=report.ok,
        )
        return document, report

    def _record(
        self,
        principal: Principal,
        result: ExecutionResult,
        started: datetime,
        finished: datetime,
        request_id: str | None,
        replay_of: str | None = None,
        replay_ok: bool | None = None,
    ) -> dict[str, Any]:
        status = outcome_of(result)
        duration_s = Decimal(0) if result.cache_hit else Decimal(result.duration_ms)
        duration_s = duration_s / 1000
        produced = produced_digests(result)
        for digest in produced:
            self.cas.pin(digest, f"tenant:{principal.tenant_id}")

        def write(session: Session) -> Execution:
            row = Execution(
                id=new_id("ex"),
                tenant_id=principal.tenant_id,
                actor=principal.actor,
                request_digest=result.request_digest,
                result_digest=result.result_digest,
                result_blob=result.result_blob,
                status=status,
                exit_code=result.exit_code,
                error_code=result.error_code,
                cache_hit=result.cache_hit,
                replay_of=replay_of,
                started_at=started,
                finished_at=finished,
                duration_ms=int((finished - started).total_seconds() * 1000),
            )
            session.add(row)
            session.add(
                CostRecord(
                    tenant_id=principal.tenant_id,
                    execution_id=row.id,
                    units=duration_s,
                    cost=duration_s * self.cost_per_second,
                )
            )
            own(session, principal.tenant_id, produced)
            details: dict[str, Any] = {
                "request_digest": result.request_digest,
                "result_digest": result.result_digest,
                "status": status,
                "cache_hit": result.cache_hit,
            }
            if replay_of is not None:
                details["replay_of"] = replay_of
                details["replay_ok"] = replay_ok
            audit.record(
                session,
                "execution.replay" if replay_of else "execution.run",
                actor=principal.actor,
                tenant_id=principal.tenant_id,
                target=row.id,
                outcome="success" if status == "succeeded" else "failure",
                source="api",
                request_id=request_id,
                details=details,
            )
            return row

        row = self.writer.write(write)
        return execution_document(row, result.model_dump(mode="json"))

    # -- reading -----------------------------------------------------------------

    def get(self, tenant_id: str, execution_id: str) -> dict[str, Any]:
        with self.sessions() as session:
            row = self._row(session, tenant_id, execution_id)
        stored = None
        if row.result_blob is not None:
            stored = load_result(self.cas, row.result_blob).model_dump(mode="json")
        return execution_document(row, stored)

    def list(
        self,
        tenant_id: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page:
        """Newest first; ``next_cursor`` continues after the last item."""
        query = select(Execution).where(Execution.tenant_id == tenant_id)
        if status is not None:
            query = query.where(Execution.status == status)
        if since is not None:
            query = query.where(Execution.started_at >= since)
        if until is not None:
            query = query.where(Execution.started_at < until)
        if cursor is not None:
            at, last_id = decode_cursor(cursor)
            query = query.where(
                (Execution.started_at < at)
                | ((Execution.started_at == at) & (Execution.id < last_id))
            )
        query = query.order_by(Execution.started_at.desc(), Execution.id.desc())

        with self.sessions() as session:
            rows = list(session.scalars(query.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]) if more and rows else None
        return Page([execution_document(r, None) for r in rows], next_cursor)

    @staticmethod
    def _row(session: Session, tenant_id: str, execution_id: str) -> Execution:
        row = session.get(Execution, execution_id)
        if row is None or row.tenant_id != tenant_id:
            msg = f"no execution {execution_id!r}"
            raise ExecutionNotFound(msg, execution_id=execution_id)
        return row


def produced_digests(result: ExecutionResult) -> list[str]:
    """Every CAS object an execution's result refers to, result blob included."""
    digests = {result.stdout_digest, result.stderr_digest}
    digests.update(result.output_digests.values())
    digests.update(result.request.get("inputs", {}).values())
    for blob in (result.result_blob, getattr(result, "request_blob", None)):
        if blob:
            digests.add(blob)
    return sorted(d for d in digests if dg.is_digest(d))


def own(session: Session, tenant_id: str, digests: Iterable[str]) -> None:
    """Record that ``tenant_id`` may read ``digests`` (existing rows are kept)."""
    rows = [
        {"tenant_id": tenant_id, "digest": d, "created_at": utcnow()} for d in digests
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(CasOwnership).values(rows).on_conflict_do_nothing()
    session.execute(statement)


def owns(session: Session, tenant_id: str, digest: str) -> bool:
    return (
        session.get(CasOwnership, {"tenant_id": tenant_id, "digest": digest})
        is not None
    )


def load_result(cas: LocalCAS, blob: str) -> ExecutionResult:
    """The result stored at ``blob`` (verified on read by the CAS)."""
    stored = dg.parse_json(cas.get_bytes(blob))
    stored.pop("kind", None)
    return ExecutionResult.model_validate({**stored, "result_blob": blob})


def execution_document(row: Execution, result: dict[str, Any] | None) -> dict[str, Any]:
    def when(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()

    return {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "status": row.status,
        "request_digest": row.request_digest,
        "result_digest": row.result_digest,
        "result_blob": row.result_blob,
        "exit_code": row.exit_code,
        "error_code": row.error_code,
        "cache_hit": row.cache_hit,
        "replay_of": row.replay_of,
        "started_at": when(row.started_at),
        "finished_at": when(row.finished_at),
        "duration_ms": row.duration_ms,
        "result": result,
    }


def period_start(period: str, now: datetime) -> datetime:
    """Start of the budget period containing ``now`` (day, week or month; UTC)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def encode_cursor(row: Execution) -> str:
    moment = row.started_at
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    raw = f"{moment.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        at, _, last_id = base64.urlsafe_b64decode(padded).decode().partition("|")
        moment = datetime.fromisoformat(at)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor("cursor is not one this server gave out") from exc
    if not last_id or "\x00" in last_id:
        raise InvalidCursor("cursor is not one this server gave out")
    return moment, last_id
