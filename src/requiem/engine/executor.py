"""The engine: check a request, run it in a scratch workspace, record the result.

``Engine.run`` goes through the same phases every time:

1. normalise — snapshot ``workspace_root`` into inputs, filter the env;
2. check — required env present, strict mode satisfiable (nothing spawned yet);
3. look up the action cache;
4. materialise inputs into a scratch directory whose path depends only on the
   request digest, build the environment and the sandbox command line, run;
5. capture streams and declared outputs into the CAS, write the ordered trace;
6. digest, store the result and index it in the action cache.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requiem import digest as dg
from requiem import log
from requiem.cas.store import LocalCAS
from requiem.engine import cache, sandbox
from requiem.engine.envbuild import build_env
from requiem.engine.errors import InvalidRequest, ReplayFailed, StorageFailed
from requiem.engine.models import ExecutionRequest, ExecutionResult
from requiem.engine.policy import (
    EnvDecision,
    check_required,
    check_strict,
    filter_env,
)
from requiem.engine.replay import DRIFT_DETECTED, ReplayReport, compare
from requiem.engine.runner import Captured, Completed, run_process
from requiem.engine.workspace import (
    MAX_OUTPUT_BYTES,
    OutputProblem,
    Scratch,
    capture_outputs,
    materialise,
    scratch,
    snapshot,
)
from requiem.errors import RequiemError
from requiem.settings import Settings

_log = log.get("requiem.engine")

SCRATCH_KEY_CHARS = 32
# What a refusing disk says; any other OSError is a bug and is not relabelled.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
)


@dataclass(frozen=True)
class Launch:
    """How one run is started: the full command line and what the child sees."""

    argv: list[str]
    host_cwd: Path
    env: dict[str, str]
    child_cwd: str
    visible: dict[str, Path]  # child path prefix → host path
    applied: dict[str, Any]


class Engine:
    """Runs requests against one CAS; safe to share between threads."""

    def __init__(self, cas: LocalCAS, settings: Settings) -> None:
        self.cas = cas
        self.settings = settings
        self.epoch = settings.int("REQUIEM_SOURCE_DATE_EPOCH")
        self.work_dir = Path(str(settings.get("REQUIEM_WORK_DIR"))).expanduser()
        self.work_dir = self.work_dir.absolute()

    def capabilities(self) -> sandbox.Capabilities:
        return sandbox.probe(self.settings)

    # -- public ----------------------------------------------------------------------

    def run(self, request: ExecutionRequest, use_cache: bool = True) -> ExecutionResult:
        """Run ``request`` (or answer from the action cache); see the module doc.

        Raises StorageFailed when the disk refuses a write (full, read-only,
        failing); nothing is cached then.
        """
        return self._execute(request, lookup=use_cache, store=True)

    def replay(self, result: ExecutionResult) -> ReplayReport:
        """Run the stored request of ``result`` again, uncached, and compare."""
        try:
            request = ExecutionRequest.from_mapping(result.request)
            replayed = self._execute(request, lookup=False, store=False)
        except RequiemError as exc:
            msg = f"replay could not run: {exc.code}: {exc.message}"
            raise ReplayFailed(msg, cause=exc.code) from exc
        differences = compare(result, replayed)
        if differences:
            DRIFT_DETECTED.inc()
        return ReplayReport(
            ok=not differences, differences=differences, replayed=replayed
        )

    def normalise(
        self, request: ExecutionRequest
    ) -> tuple[ExecutionRequest, EnvDecision]:
        """The request as digested: env filtered, workspace snapshotted.

        The snapshot leaves out the declared outputs, and explicit ``inputs`` win
        over snapshotted files of the same path.

        Raises EnvRequiredMissing before the workspace is read.
        """
        decision = filter_env(request)
        check_required(request.policy, decision)
        inputs = dict(request.inputs)
        if request.workspace_root is not None:
            snapped = snapshot(
                self.cas,
                request.workspace_root,
                skip_dirs=(self.settings.home, self.work_dir),
            )
            # Declared outputs are what the run makes; an old copy left in the
            # workspace (say, by `requiem run` copying it back) is not an input.
            for path in request.outputs:
                snapped.pop(path, None)
            inputs = {**snapped, **inputs}
        normal = ExecutionRequest.model_validate(
            {
                **request.model_dump(),
                "workspace_root": None,
                "env": decision.env,
                "inputs": inputs,
            }
        )
        return normal, decision

    # -- phases ----------------------------------------------------------------------

    def _execute(
        self, request: ExecutionRequest, *, lookup: bool, store: bool
    ) -> ExecutionResult:
        try:
            return self._execute_unguarded(request, lookup=lookup, store=store)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            msg = f"writing the run's files failed: {exc.strerror}"
            raise StorageFailed(msg, errno=exc.errno) from exc

    def _execute_unguarded(
        self, request: ExecutionRequest, *, lookup: bool, store: bool
    ) -> ExecutionResult:
        normal, decision = self.normalise(request)
        caps = self.capabilities()
        check_strict(normal.policy, self._gaps(normal, caps))

        request_digest = normal.digest()
        key = cache.cache_key(request_digest, normal.inputs)
        if lookup and (hit := cache.lookup(self.cas, key, request_digest)):
            _log.info("engine.cache_hit", request_digest=request_digest)
            return hit.model_copy(update={"request_id": request.request_id})
        # Every object of the run is written without its own fsync; one
        # filesystem sync makes them durable before the cache entry names them.
        request_blob = self.cas.put_bytes(
            dg.canonical_json(
                {"kind": "requiem.request", "request": normal.canonical()}
            ),
            durable=False,
        )

        # Held until the result is in the cache, so an identical request that
        # waited for this one finds it there instead of running again.
        with scratch(self.work_dir, request_digest[:SCRATCH_KEY_CHARS]) as place:
            if lookup and (hit := cache.lookup(self.cas, key, request_digest)):
                return hit.model_copy(update={"request_id": request.request_id})
            materialise(self.cas, normal.inputs, place.workspace, self.epoch)
            launch = self._launch(normal, place, caps)
            completed, trace = self._spawn(normal, launch, place)
            outputs, problems = capture_outputs(
                self.cas, place.workspace, normal.outputs
            )
            result = self._result(
                normal, decision, launch, completed, trace, outputs, problems
            )
            result = result.model_copy(
                update={"request_id": request.request_id, "request_blob": request_blob}
            )

            blob = self.cas.put_bytes(dg.canonical_json(result.stored()), durable=False)
            if store:
                # Every result handed out stays verifiable: its blob is a GC root
                # even when it is not (or no longer) the action cache's answer.
                self.cas.pin(blob, "result")
            self.cas.sync()
            if store and _cacheable(normal, result):
                cache.store(self.cas, key, blob)
        _log.info(
            "engine.run",
            request_digest=request_digest,
            result_digest=result.result_digest,
            exit_code=result.exit_code,
            error_code=result.error_code,
            duration_ms=result.duration_ms,
        )
        return result.model_copy(update={"result_blob": blob})

    def _result(
        self,
        normal: ExecutionRequest,
        decision: EnvDecision,
        launch: Launch,
        completed: Completed,
        trace: list[dict[str, Any]],
        outputs: dict[str, str],
        problems: list[OutputProblem],
    ) -> ExecutionResult:
        """The finished trace, the digests and the result document."""
        for rel in normal.outputs:
            if rel in outputs:
                size = self.cas.meta(outputs[rel]).size
                trace.append(
                    {"event": "output_captured", "path": rel, "digest": outputs[rel]}
                    | {"size": size}
                )
        for problem in problems:
            trace.append(
                {"event": "output_missing", "path": problem.path}
                | {"reason": problem.reason}
            )
        error_code, error_message = _error_of(completed, normal, problems)
        events = [{"seq": n, **event} for n, event in enumerate(trace)]
        applied = {
            **launch.applied,
            "leftover_processes_killed": completed.killed_leftovers,
        }

        result = ExecutionResult(
            ok=completed.exit_code == 0 and error_code is None,
            exit_code=completed.exit_code,
            error_code=error_code,
            error_message=error_message,
            termination_reason=completed.termination_reason,
            stdout=_preview(completed.stdout),
            stderr=_preview(completed.stderr),
            stdout_truncated=completed.stdout.truncated,
            stderr_truncated=completed.stderr.truncated,
            stdout_size=completed.stdout.size,
            stderr_size=completed.stderr.size,
            request_digest=normal.digest(),
            stdout_digest=completed.stdout.digest,
            stderr_digest=completed.stderr.digest,
            output_digests=outputs,
            trace_digest=dg.of_record("trace", events),
            result_digest="0" * 64,  # replaced below: it digests the fields above
            trace_events=events,
            policy_applied=_policy_applied(normal, decision, launch.env),
            sandbox_applied=applied,
            duration_ms=completed.duration_ms,
            peak_memory_bytes=completed.peak_memory_bytes,
            request=normal.canonical(),
        )
        return result.model_copy(
            update={"result_digest": dg.of_record("res", result.reproducible())}
        )

    def _gaps(self, request: ExecutionRequest, caps: sandbox.Capabilities) -> list[str]:
        """What the policy asks for that this machine cannot enforce."""
        policy = request.policy
        gaps = []
        if policy.sandbox and not caps.bwrap_works:
            gaps.append("bubblewrap")
        if policy.time_mode == "fixed" and not caps.faketime_works:
            gaps.append("libfaketime")
        limits = (policy.max_memory_bytes, policy.max_fds, policy.max_cpu_seconds)
        if any(limit is not None for limit in limits) and not caps.rlimits:
            gaps.append("prlimit")
        return gaps

    def _launch(
        self, request: ExecutionRequest, place: Scratch, caps: sandbox.Capabilities
    ) -> Launch:
        policy = request.policy
        sandboxed = policy.sandbox and caps.bwrap_works and caps.bwrap_path is not None
        frozen = policy.time_mode == "fixed" and caps.faketime_works
        faketime = caps.faketime_path if frozen else None
        missing = [
            path for path in policy.ro_paths if sandboxed and not os.path.exists(path)
        ]
        if missing:
            msg = f"ro_paths entry {missing[0]} does not exist on this host"
            raise InvalidRequest(msg, field="policy.ro_paths")

        if sandboxed:
            root = sandbox.SANDBOX_WORKSPACE
            child_cwd = root if request.cwd == "." else f"{root}/{request.cwd}"
            home, tmpdir = root, "/tmp"
        else:
            root = str(place.workspace)
            child_cwd = str(place.workspace / request.cwd)
            home, tmpdir = root, str(place.tmp)
            place.tmp.mkdir(mode=0o700)
        host_cwd = place.workspace / request.cwd
        if host_cwd.exists() and not host_cwd.is_dir():
            msg = f"cwd {request.cwd!r} is an input file, not a directory"
            raise InvalidRequest(msg, field="cwd")
        host_cwd.mkdir(parents=True, exist_ok=True)

        env = build_env(
            request.env,
            home=home,
            tmpdir=tmpdir,
            cwd=child_cwd,
            epoch=self.epoch,
            frozen_clock=frozen,
        )
        limits = {
            "max_memory_bytes": policy.max_memory_bytes,
            "max_fds": policy.max_fds,
            "max_cpu_seconds": policy.max_cpu_seconds,
        }
        wrapper: list[str] = []
        if caps.rlimits and caps.prlimit_path:
            wrapper = sandbox.prlimit_argv(caps.prlimit_path, **limits)

        if sandboxed:
            argv = sandbox.bwrap_argv(
                str(caps.bwrap_path),
                workspace=place.workspace,
                etc_dir=sandbox.synthetic_etc(place.base),
                network=policy.network == "host",
                ro_paths=policy.ro_paths,
                faketime=faketime,
                cwd=child_cwd,
            )
            spawn_env = env
            visible = {prefix: Path(prefix) for prefix in sandbox.SYSTEM_DIRS}
            visible.update({path: Path(path) for path in policy.ro_paths})
            visible[sandbox.SANDBOX_WORKSPACE] = place.workspace
        else:
            argv = []
            spawn_env = {**env, "LD_PRELOAD": faketime} if faketime else env
            visible = {"/": Path("/")}
        argv = [*argv, *wrapper]

        enforced, not_enforced = _enforcement(policy, sandboxed, frozen, wrapper)
        applied = {
            "bubblewrap": sandboxed,
            "namespaces": ["user", "pid", "net", "ipc", "uts", "mount", "cgroup"]
            if sandboxed
            else [],
            "network": policy.network if sandboxed else "host",
            "workspace_path": root,
            "hostname": sandbox.SANDBOX_HOSTNAME if sandboxed else None,
            "clock": "frozen at SOURCE_DATE_EPOCH" if frozen else "real",
            "time_mode": policy.time_mode,
            "umask": "0022",
            "rlimits": {k: v for k, v in limits.items() if v is not None}
            if wrapper
            else {},
            "enforced": enforced,
            "not_enforced": not_enforced,
            "notes": list(caps.notes),
        }
        if sandboxed and policy.network == "host":
            applied["namespaces"].remove("net")
        return Launch(argv, host_cwd, spawn_env, child_cwd, visible, applied)

    def _spawn(
        self, request: ExecutionRequest, launch: Launch, place: Scratch
    ) -> tuple[Completed, list[dict[str, Any]]]:
        trace: list[dict[str, Any]] = [
            {"event": "inputs_materialised", "files": len(request.inputs)}
        ]
        problem = _resolve_command(request.command, launch)
        if problem is None:
            completed = run_process(
                [*launch.argv, request.command, *request.argv],
                cwd=launch.host_cwd,
                env=launch.env,
                timeout_ms=request.timeout_ms,
                cas=self.cas,
                preview_bytes=request.max_output_bytes,
                marker=None
                if launch.applied["bubblewrap"]
                else f"HOME={place.workspace}",
                isolated=launch.applied["bubblewrap"],
            )
        else:
            empty = self.cas.put_bytes(b"", durable=False)
            completed = Completed(
                exit_code=127,
                termination_reason="spawn_failed",
                stdout=Captured(digest=empty),
                stderr=Captured(digest=empty),
                duration_ms=0,
                spawn_error=problem,
            )

        if completed.termination_reason == "spawn_failed":
            trace.append(
                {"event": "spawn_failed", "command": request.command}
                | {"reason": completed.spawn_error or "unknown"}
            )
            return completed, trace
        trace.append({"event": "process_started", "command": request.command})
        if completed.termination_reason == "timeout":
            trace.append(
                {"event": "process_timed_out", "timeout_ms": request.timeout_ms}
            )
        else:
            trace.append({"event": "process_exited", "exit_code": completed.exit_code})
        for name, captured in (
            ("stdout", completed.stdout),
            ("stderr", completed.stderr),
        ):
            trace.append(
                {"event": "stream_captured", "stream": name, "digest": captured.digest}
                | {"size": captured.size}
            )
        return completed, trace


def _resolve_command(command: str, launch: Launch) -> str | None:
    """Why ``command`` cannot be started as the child would see it, or None."""
    if "/" in command:
        candidates = [os.path.join(launch.child_cwd, command)]
    else:
        search = launch.env.get("PATH", "").split(":")
        candidates = [
            os.path.join(launch.child_cwd, entry, command) for entry in search if entry
        ]
    seen_file = False
    for candidate in candidates:
        host = _host_path(os.path.normpath(candidate), launch.visible)
        if host is None or not os.path.isfile(host):
            continue
        seen_file = True
        if os.access(host, os.X_OK):
            return None
    return "not_executable" if seen_file else "not_found"


def _host_path(child_path: str, visible: dict[str, Path]) -> Path | None:
    best = ""
    for prefix in visible:
        inside = child_path == prefix or child_path.startswith(prefix.rstrip("/") + "/")
        if inside and len(prefix) > len(best):
            best = prefix
    if not best:
        return None
    rest = child_path[len(best) :].lstrip("/")
    return visible[best] / rest if rest else visible[best]


def _enforcement(
    policy: Any, sandboxed: bool, frozen: bool, wrapper: list[str]
) -> tuple[list[str], list[str]]:
    enforced = ["env_built_from_nothing", "scratch_workspace", "umask_022"]
    not_enforced = []
    if sandboxed:
        enforced += ["filesystem_isolation", "pid_namespace", "fixed_hostname"]
        if policy.network == "none":
            enforced.append("no_network")
    elif policy.sandbox:
        not_enforced += ["filesystem_isolation", "fixed_hostname", "no_network"]
    else:
        not_enforced += ["filesystem_isolation", "fixed_hostname"]
    if frozen:
        enforced.append("fixed_clock")
    elif policy.time_mode == "fixed":
        not_enforced.append("fixed_clock")
    if wrapper:
        enforced.append("rlimits")
    else:
        not_enforced.append("rlimits")
    return enforced, not_enforced


def _error_of(
    completed: Completed, request: ExecutionRequest, problems: list[Any]
) -> tuple[str | None, str | None]:
    if completed.termination_reason == "timeout":
        return "timeout", f"timed out after {request.timeout_ms} ms"
    if completed.termination_reason == "spawn_failed":
        why = {"not_found": "was not found", "not_executable": "is not executable"}
        said = why.get(completed.spawn_error or "", f"failed: {completed.spawn_error}")
        return "spawn_failed", f"command {request.command!r} {said}"
    escaped = [p for p in problems if p.reason == "path_escape"]
    if escaped:
        return "path_escape", f"output {escaped[0].path!r} leads outside the workspace"
    too_large = [p for p in problems if p.reason == "too_large"]
    if too_large:
        limit = f"{MAX_OUTPUT_BYTES >> 30} GiB"
        msg = f"output {too_large[0].path!r} would take the outputs past {limit}"
        return "output_too_large", msg
    if problems:
        first = problems[0]
        said = "was not produced" if first.reason == "absent" else "is not a file"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return "missing_output", f"declared output {first.path!r} {said}{more}"
    return None, None


def _preview(captured: Captured) -> str:
    return captured.preview.decode("utf-8", errors="replace")


def _policy_applied(
    request: ExecutionRequest, decision: EnvDecision, env: dict[str, str]
) -> dict[str, Any]:
    """Which policy was applied, with environment key names and never values."""
    policy = request.policy
    return {
        "mode": policy.mode,
        "time_mode": policy.time_mode,
        "sandbox": policy.sandbox,
        "network": policy.network,
        **decision.applied(),
        "env_fixed": sorted(set(env) - set(decision.env)),
    }


def _cacheable(request: ExecutionRequest, result: ExecutionResult) -> bool:
    """Only runs that ended on their own under the fixed clock are reused."""
    return result.termination_reason == "exited" and request.policy.time_mode == "fixed"
