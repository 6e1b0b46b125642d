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


def test_tables_never_cut_ids_or_timestamps_in_a_narrow_pipe(home, monkeypatch, capsys):
    from rich.console import Console

    from requiem.cli import output, service_cmd

    monkeypatch.setattr(output, "out", Console(width=40, soft_wrap=True))
    service_cmd.tenant_create("a-tenant-with-a-rather-long-name", operator=False)
    tenant_id = capsys.readouterr().out.strip()
    service_cmd.key_generate(name="ci", tenant=None, role="viewer")
    capsys.readouterr()
    service_cmd.key_list(as_json=True)
    key = json.loads(capsys.readouterr().out)[0]
    service_cmd.key_list()
    keys_table = capsys.readouterr().out
    service_cmd.tenant_list(as_json=True)
    tenant = json.loads(capsys.readouterr().out)[0]
    service_cmd.tenant_list()
    tenants_table = capsys.readouterr().out

    for whole in (key["id"], key["prefix"], tenant_id, key["created_at"]):
        assert whole in keys_table, keys_table
    assert tenant_id in tenants_table, tenants_table
    assert tenant["created_at"] in tenants_table, tenants_table
