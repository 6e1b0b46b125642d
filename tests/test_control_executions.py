"""The executions service's rules that need no engine run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from requiem.control import executions
from requiem.engine import ExecutionRequest


def test_host_paths_are_refused_over_http():
    rooted = ExecutionRequest.from_mapping({"command": "true", "workspace_root": "/w"})
    exposed = ExecutionRequest.from_mapping(
        {"command": "true", "policy": {"ro_paths": ["/srv/data"]}}
    )

    with pytest.raises(executions.RefusedOverHttp) as root:
        executions.refuse_host_fields(rooted)
    with pytest.raises(executions.RefusedOverHttp) as paths:
        executions.refuse_host_fields(exposed)

    assert root.value.details == {"field": "workspace_root"}
    assert paths.value.details == {"field": "policy.ro_paths"}


@pytest.mark.parametrize(
    ("policy", "field"),
    [({"sandbox": False}, "policy.sandbox"), ({"network": "host"}, "policy.network")],
)
def test_only_operator_tenants_may_leave_the_sandbox(policy, field):
    request = ExecutionRequest.from_mapping({"command": "true", "policy": policy})

    with pytest.raises(executions.RefusedOverHttp) as refused:
        executions.refuse_host_fields(request)
    executions.refuse_host_fields(request, trusted=True)

    assert refused.value.details == {"field": field}


@pytest.mark.parametrize("cursor", ["", "!!!", "bm90LWEtY3Vyc29y", "MjAyNnw"])
def test_a_cursor_not_given_out_is_400_invalid_cursor(cursor):
    with pytest.raises(executions.InvalidCursor) as bad:
        executions.decode_cursor(cursor)

    assert (bad.value.code, bad.value.http_status) == ("invalid_cursor", 400)


def test_budget_periods_start_at_utc_midnight_monday_and_the_first():
    now = datetime(2026, 12, 4, 15, 30, tzinfo=UTC)  # a Friday

    assert executions.period_start("day", now) == datetime(2026, 12, 4, tzinfo=UTC)
    assert executions.period_start("week", now) == datetime(2026, 11, 30, tzinfo=UTC)
    assert executions.period_start("month", now) == datetime(2026, 12, 1, tzinfo=UTC)
