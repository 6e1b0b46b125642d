"""Parsing and normalising requests: each bad input has its own code, nothing runs."""

from __future__ import annotations

import json

import pytest

from requiem.engine import ExecutionRequest
from requiem.engine.policy import filter_env, is_secret_name
from requiem.errors import RequiemError

DIGEST = "a" * 64


def parse_error(raw: str | bytes) -> RequiemError:
    with pytest.raises(RequiemError) as caught:
        ExecutionRequest.parse(raw)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "code", "status"),
    [
        ('{"command": "true",', "json_parse_error", 400),
        ('{"command": NaN}', "json_parse_error", 400),
        ('{"command": "a", "command": "b"}', "json_duplicate_key", 400),
        ('["true"]', "invalid_request", 400),
        ('{"argv": []}', "invalid_request", 400),
        ('{"command": "true", "shell": true}', "invalid_request", 400),
        ('{"command": "true", "timeout_ms": "5"}', "invalid_request", 400),
        ('{"command": "true", "timeout_ms": 0}', "invalid_request", 400),
        ('{"command": "true", "inputs": {"a": "xyz"}}', "invalid_request", 400),
        ('{"command": "true", "request_id": "has space"}', "invalid_request_id", 400),
        ('{"command": "true", "request_id": ""}', "invalid_request_id", 400),
        ('{"command": "true", "policy": {"mode": "yolo"}}', "invalid_policy", 400),
        ('{"command": "true", "policy": {"network": "lan"}}', "invalid_policy", 400),
        ('{"command": "true", "policy": {"colour": 1}}', "invalid_policy", 400),
        (
            '{"command": "true", "policy": {"mode": "strict", "sandbox": false}}',
            "invalid_policy",
            400,
        ),
        ('{"command": "true", "policy": {"ro_paths": ["rel"]}}', "invalid_policy", 400),
        ('{"command": "true", "policy": {"ro_paths": ["/"]}}', "invalid_policy", 400),
        (
            '{"command": "true", "policy": {"ro_paths": ["/proc/1"]}}',
            "invalid_policy",
            400,
        ),
        (
            '{"command": "true", "policy": {"ro_paths": ["/tmp"]}}',
            "invalid_policy",
            400,
        ),
        ('{"command": "true", "cwd": "../up"}', "path_escape", 400),
        ('{"command": "true", "cwd": "/etc"}', "path_escape", 400),
        ('{"command": "true", "outputs": ["a/../../b"]}', "path_escape", 400),
        ('{"command": "true", "outputs": ["/etc/passwd"]}', "path_escape", 400),
        (
            f'{{"command": "true", "inputs": {{"../x": "{DIGEST}"}}}}',
            "path_escape",
            400,
        ),
    ],
)
def test_bad_request_gets_its_code(raw: str, code: str, status: int):
    error = parse_error(raw)

    assert (error.code, error.http_status) == (code, status)


def test_a_host_path_below_tmp_may_be_exposed_read_only():
    """A checkout or virtualenv under /tmp is bound into the sandbox's private /tmp."""
    request = ExecutionRequest.parse(
        '{"command": "true", "policy": {"ro_paths": ["/tmp/checkout/.venv"]}}'
    )

    assert request.policy.ro_paths == ["/tmp/checkout/.venv"]


def test_more_than_256_outputs_is_too_many_outputs():
    raw = json.dumps({"command": "true", "outputs": [f"o{i}" for i in range(257)]})

    error = parse_error(raw)

    assert (error.code, error.http_status, error.exit_code) == (
        "too_many_outputs",
        400,
        2,
    )


def test_request_over_one_mebibyte_is_too_large_before_parsing():
    raw = b'{"command": "true", "argv": ["' + b"x" * (1 << 20) + b'"]}'

    error = parse_error(raw)

    assert (error.code, error.http_status, error.exit_code) == (
        "request_too_large",
        413,
        2,
    )


def test_paths_are_normalised_and_outputs_sorted():
    request = ExecutionRequest.parse(
        json.dumps(
            {
                "command": "true",
                "cwd": "./sub//dir/",
                "inputs": {"./b/x": DIGEST},
                "outputs": ["z", "./a", "z"],
            }
        )
    )

    assert request.cwd == "sub/dir"
    assert request.inputs == {"b/x": DIGEST}
    assert request.outputs == ["a", "z"]


def test_a_path_that_is_both_file_and_directory_is_refused():
    raw = json.dumps({"command": "true", "inputs": {"a": DIGEST, "a/b": DIGEST}})

    assert parse_error(raw).code == "invalid_request"


def test_request_id_and_workspace_root_do_not_change_the_digest():
    plain = ExecutionRequest.parse('{"command": "true"}')
    labelled = ExecutionRequest.parse(
        '{"command": "true", "request_id": "run-1", "workspace_root": "/somewhere"}'
    )

    assert plain.digest() == labelled.digest()
    assert "request_id" not in plain.canonical()


def test_a_parsed_mapping_is_accepted_like_its_json():
    raw = {"command": "echo", "argv": ["hi"]}

    assert ExecutionRequest.parse(raw) == ExecutionRequest.parse(json.dumps(raw))


@pytest.mark.parametrize(
    "name",
    [
        "GITHUB_TOKEN",
        "api_secret",
        "STRIPE_KEY",
        "DB_PASSWORD",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AUTHORIZATION",
        "COOKIE_JAR",
        "AWS_REGION",
        "DATABASE_URL",
        "REQUIEM_API_KEY",
        "REQUIEM_SECRET_KEY",
        "SSH_AUTH_SOCK",
    ],
)
def test_secret_names_are_recognised(name: str):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["PATH", "GREETING", "KEYBOARD", "MONKEY"])
def test_ordinary_names_are_not_secrets(name: str):
    assert not is_secret_name(name)


def test_env_filter_applies_allow_deny_secret_and_reserved_rules():
    request = ExecutionRequest.parse(
        json.dumps(
            {
                "command": "true",
                "env": {
                    "KEEP": "1",
                    "DROP_ME": "2",
                    "OTHER": "3",
                    "API_TOKEN": "t",
                    "LD_PRELOAD": "/evil.so",
                    "TZ": "Asia/Tokyo",
                },
                "policy": {
                    "env_allow": ["KEEP", "DROP_*", "*_TOKEN", "LD_*", "TZ"],
                    "env_deny": ["DROP_*"],
                },
            }
        )
    )

    decision = filter_env(request)

    assert decision.env == {"KEEP": "1"}
    assert decision.applied() == {
        "env_passed": ["KEEP"],
        "env_not_allowed": ["OTHER"],
        "env_denied": ["DROP_ME"],
        "env_secret_stripped": ["API_TOKEN"],
        "env_reserved": ["LD_PRELOAD", "TZ"],
    }
