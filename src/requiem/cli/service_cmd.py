"""The service's commands: serve, status, flags, tenant, api-key.

``serve``, ``status`` and ``flags`` talk to or are the server; ``tenant`` and
``api-key`` work offline on the database, so an operator can create the first tenant
and key before any server runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from requiem import __version__, errors, settings
from requiem.cli import output
from requiem.cli.client import ApiClient
from requiem.control import credentials, tenants
from requiem.store.bootstrap import ensure_schema
from requiem.store.db import make_engine, session_factory, transaction

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
# Never cut in a table: ids, key prefixes, tenants and timestamps get pasted.
WHOLE_COLUMNS = ("id", "prefix", "tenant", "created_at", "updated_at", "updated_by")


@contextmanager
def _database() -> Iterator[Session]:
    """One committed transaction on the configured database (schema ensured)."""
    config = settings.load()
    engine = make_engine(config)
    try:
        ensure_schema(engine)
        with transaction(session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


# -- serve -----------------------------------------------------------------------


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
) -> None:
    """Run the HTTP API (binds 127.0.0.1:8080 unless told otherwise)."""
    from requiem.api.server import bind
    from requiem.api.server import serve as run_server
    from requiem.store import profile

    config = settings.load()
    profile.check(config)
    engine = make_engine(config)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()

    bind_host = host or str(config.get("REQUIEM_HOST"))
    bind_port = port if port is not None else config.int("REQUIEM_PORT")
    count = workers if workers is not None else config.int("REQUIEM_WORKERS")
    if not 0 < bind_port < 65536:
        raise errors.UsageError(f"--port {bind_port} is not a TCP port")
    if count < 1:
        raise errors.UsageError("--workers must be at least 1")
    sock = bind(bind_host, bind_port)
    output.note(f"requiem {__version__} serving on http://{bind_host}:{bind_port}")
    code = run_server(
        sock,
        count,
        config.float("REQUIEM_SHUTDOWN_GRACE_S"),
        str(config.get("REQUIEM_LOG_LEVEL")),
    )
    raise typer.Exit(code)


# -- status ----------------------------------------------------------------------


def status(as_json: JsonFlag = False) -> None:
    """One screen: server, version, database, CAS, flags, active requests, pool."""
    client = ApiClient.from_settings(settings.load())
    try:
        health = client.get("/api/health")
    except client_errors() as exc:
        health = _health_from_error(exc)
    document: dict[str, Any] = {
        "url": client.base_url,
        "reachable": health is not None,
        "health": health,
    }
    if health is not None:
        document["server"] = _optional(client, "/api/v1/status")
    document["maintenance"] = _maintenance(document)

    if as_json:
        output.print_json(document)
    else:
        _print_status(document)
    if health is None:
        raise errors.ServerUnreachable(
            f"no Requiem server reachable at {client.base_url} (set REQUIEM_URL)"
        )
    if not health.get("ready") or document["maintenance"]:
        raise typer.Exit(6)


def _maintenance(document: dict[str, Any]) -> bool:
    """Whether the maintenance flag is on, by the server's status or its health."""
    server = document.get("server") or {}
    if "flags" in server:
        return bool(server["flags"].get("maintenance"))
    checks = (document.get("health") or {}).get("checks") or {}
    values = (checks.get("flags") or {}).get("values") or {}
    return bool(values.get("maintenance"))


def client_errors() -> tuple[type[Exception], ...]:
    from requiem.cli.client import RemoteError

    return (RemoteError, errors.ServerUnreachable)


def _health_from_error(exc: Exception) -> dict[str, Any] | None:
    """A 503 health answer still carries the document; unreachable carries none."""
    if isinstance(exc, errors.ServerUnreachable):
        return None
    return {"ready": False, "status": "unavailable", "error": str(exc)}


def _optional(client: ApiClient, path: str) -> Any:
    try:
        return client.get(path)
    except errors.RequiemError as exc:
        return {"error": {"code": exc.code, "message": exc.message}}


def _print_status(document: dict[str, Any]) -> None:
    health = document.get("health") or {}
    rows: dict[str, Any] = {
        "server": document["url"],
        "reachable": "yes" if document["reachable"] else "no",
    }
    if document.get("maintenance"):
        rows["maintenance"] = "ON: tenant routes answer 503 maintenance"
    if health:
        rows["status"] = health.get("status")
        rows["version"] = health.get("version")
        for name, check in (health.get("checks") or {}).items():
            rows[name] = "ok" if check.get("ok") else f"FAIL {check.get('error', '')}"
    server = document.get("server") or {}
    if "error" not in server:
        for name, value in (server.get("flags") or {}).items():
            rows[f"flag {name}"] = "on" if value else "off"
        for key in ("active_requests", "executions_running", "executions_queued"):
            if key in server:
                rows[key.replace("_", " ")] = server[key]
        pool = server.get("pool")
        if pool:
            rows["pool"] = (
                f"{pool['checked_out']}/{pool['size']} checked out, "
                f"overflow {pool['overflow']}, waiters {pool['waiters']}"
                + (", draining" if pool["draining"] else "")
            )
    elif document["reachable"]:
        rows["details"] = server["error"].get("message")
    output.key_values(rows)


# -- flags -----------------------------------------------------------------------

flags_app = typer.Typer(help="Read and set operational flags on the running server.")


@flags_app.command("get")
def flags_get(
    name: Annotated[
        str | None, typer.Argument(help="Flag name; all if omitted.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one flag or all of them."""
    client = ApiClient.from_settings(settings.load())
    if name is None:
        document = client.get("/api/admin/flags")
        rows = document["flags"]
    else:
        document = client.get(f"/api/admin/flags/{name}")
        rows = [document]
    if as_json:
        output.print_json(document)
        return
    output.table(
        None,
        ["flag", "value", "updated_at", "updated_by"],
        [[r["name"], r["value"], r["updated_at"], r["updated_by"]] for r in rows],
        whole=WHOLE_COLUMNS,
    )


@flags_app.command("set")
def flags_set(
    name: Annotated[str, typer.Argument(help="execution_pause or maintenance.")],
    value: Annotated[str, typer.Argument(help="true or false.")],
    as_json: JsonFlag = False,
) -> None:
    """Set a flag (audited); every replica sees it within a second."""
    lowered = value.strip().lower()
    if lowered not in ("true", "false", "on", "off", "1", "0"):
        raise errors.UsageError(f"flag value {value!r} is not true or false")
    wanted = lowered in ("true", "on", "1")
    client = ApiClient.from_settings(settings.load())
    document = client.post(f"/api/admin/flags/{name}", json={"value": wanted})
    if as_json:
        output.print_json(document)
        return
    output.line(f"{name}: {document['old_value']} -> {document['value']}")


# -- tenant ----------------------------------------------------------------------

tenant_app = typer.Typer(help="Create, list and suspend tenants (works offline).")


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Argument(help="Unique tenant name.")],
    operator: Annotated[
        bool, typer.Option("--operator", help="May change flags and the pool.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a tenant; prints its id."""
    with _database() as session:
        tenant = tenants.create(
            session, name, is_operator=operator, actor=_actor(), source="cli"
        )
        document = tenants.as_dict(tenant)
    if as_json:
        output.print_json(document)
    else:
        output.line(str(document["id"]))


@tenant_app.command("list")
def tenant_list(as_json: JsonFlag = False) -> None:
    """Every tenant."""
    with _database() as session:
        rows = [tenants.as_dict(t) for t in tenants.list_all(session)]
    if as_json:
        output.print_json(rows)
        return
    output.table(
        None,
        ["id", "name", "status", "operator", "created_at"],
        [
            [r["id"], r["name"], r["status"], r["is_operator"], r["created_at"]]
            for r in rows
        ],
        whole=WHOLE_COLUMNS,
    )


@tenant_app.command("suspend")
def tenant_suspend(
    tenant_id: Annotated[str, typer.Option("--id", help="Tenant id or name.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")],
    as_json: JsonFlag = False,
) -> None:
    """Suspend a tenant: its executions answer 403 tenant_suspended."""
    _set_tenant_status(tenant_id, "suspended", reason, as_json)


@tenant_app.command("activate")
def tenant_activate(
    tenant_id: Annotated[str, typer.Option("--id", help="Tenant id or name.")],
    as_json: JsonFlag = False,
) -> None:
    """Lift a suspension."""
    _set_tenant_status(tenant_id, "active", None, as_json)


def _set_tenant_status(
    tenant_id: str, state: str, reason: str | None, as_json: bool
) -> None:
    with _database() as session:
        tenant = tenants.set_status(
            session, tenant_id, state, reason=reason, actor=_actor(), source="cli"
        )
        document = tenants.as_dict(tenant)
    if as_json:
        output.print_json(document)
    else:
        output.line(f"{document['id']} {document['status']}")


# -- api-key ---------------------------------------------------------------------

key_app = typer.Typer(help="Generate, list, test and revoke API keys (works offline).")


@key_app.command("generate")
def key_generate(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    tenant: Annotated[
        str | None, typer.Option(help="Tenant id or name (default: the only one).")
    ] = None,
    role: Annotated[str, typer.Option(help="admin, operator or viewer.")] = "admin",
) -> None:
    """Print a new key alone on stdout (NEW_KEY=$(…)); its details go to stderr."""
    credentials.check_role(role)
    with _database() as session:
        owner = tenant or _only_tenant(session)
        key, row = credentials.generate(
            session,
            settings.load().secret_key,
            tenant=owner,
            role=role,
            name=name,
            actor=_actor(),
            source="cli",
        )
        details = credentials.as_dict(row)
    output.line(key)
    output.note(
        f"api key {details['id']} prefix {details['prefix']} "
        f"tenant {details['tenant_id']} role {details['role']}"
    )


def _only_tenant(session: Session) -> str:
    every = tenants.list_all(session)
    if len(every) != 1:
        msg = (
            "no tenant exists; create one with: requiem tenant create NAME"
            if not every
            else "several tenants exist; choose one with --tenant"
        )
        raise errors.UsageError(msg)
    return every[0].id


@key_app.command("list")
def key_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Keys with their id, prefix, tenant, role and state (never the key)."""
    with _database() as session:
        rows = [credentials.as_dict(k) for k in credentials.list_keys(session, tenant)]
    if as_json:
        output.print_json(rows)
        return
    output.table(
        None,
        ["id", "prefix", "tenant", "role", "name", "state", "created_at"],
        [
            [
                r["id"],
                r["prefix"],
                r["tenant_id"],
                r["role"],
                r["name"],
                r["state"],
                r["created_at"],
            ]
            for r in rows
        ],
        whole=WHOLE_COLUMNS,
    )


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Option("--id", help="The key's id (key_…).")],
    as_json: JsonFlag = False,
) -> None:
    """Revoke a key: it answers 401 api_key_revoked within a second."""
    with _database() as session:
        row = credentials.revoke(session, key_id, actor=_actor(), source="cli")
        document = credentials.as_dict(row)
    if as_json:
        output.print_json(document)
    else:
        output.line(f"{document['id']} revoked")


@key_app.command("test")
def key_test(
    key: Annotated[str, typer.Option(help="The key to check.")],
    as_json: JsonFlag = False,
) -> None:
    """Say whether a key is valid, and if not why (exit 7)."""
    with _database() as session:
        principal = credentials.authenticate(session, settings.load().secret_key, key)
    document = {
        "valid": True,
        "key_id": principal.key_id,
        "tenant_id": principal.tenant_id,
        "role": principal.role,
        "tenant_status": principal.tenant_status,
    }
    if as_json:
        output.print_json(document)
    else:
        output.line(
            f"valid: key {principal.key_id} tenant {principal.tenant_id} "
            f"role {principal.role}"
        )


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
    app.command("status")(status)
    app.add_typer(flags_app, name="flags")
    app.add_typer(tenant_app, name="tenant")
    app.add_typer(key_app, name="api-key")
