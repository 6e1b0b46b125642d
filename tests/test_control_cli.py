"""``requiem tenant`` and ``requiem api-key``: offline on the database."""

from __future__ import annotations

import json
import re


def test_generate_prints_the_key_alone_and_details_on_stderr(cli):
    created = cli("tenant", "create", "acme", "--operator")
    made = cli("api-key", "generate", "--name", "rotation-1", "--role", "viewer")
    key = made.stdout.strip()
    wrong = cli("api-key", "test", "--key", key[:-1], "--json")

    assert created.code == 0 and created.stdout.startswith("t_")
    assert made.code == 0 and made.stdout == key + "\n"
    assert re.fullmatch(r"rqm_[A-Za-z0-9_-]{43}", key)
    assert "role viewer" in made.stderr and key not in made.stderr
    assert wrong.code == 7 and "error[invalid_api_key]" in wrong.stderr
    assert json.loads(wrong.stdout)["error"]["code"] == "invalid_api_key"
