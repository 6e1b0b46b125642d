"""The `requiem` entry point: one-line errors, exit codes, the colon alias."""

from __future__ import annotations

from requiem.cli.main import expand_colon_alias


def test_colon_alias_splits_the_first_word_only():
    assert expand_colon_alias(["db:pool:status", "--json"]) == [
        "db",
        "pool",
        "status",
        "--json",
    ]
    assert expand_colon_alias(["digest", "a:b"]) == ["digest", "a:b"]
    assert expand_colon_alias(["--x:y"]) == ["--x:y"]


def test_unknown_command_is_one_usage_line(cli):
    result = cli("no-such-command")

    assert result.code == 2
    assert (
        result.stderr
        == "requiem: error[usage_error]: No such command 'no-such-command'.\n"
    )
    assert result.stdout == ""


def test_requiem_error_is_one_line_with_its_exit_code(cli, tmp_path):
    result = cli("digest", str(tmp_path / "missing.bin"))

    assert result.code == 3
    assert result.stderr.startswith("requiem: error[file_not_found]: no such file: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_json_mode_also_puts_the_error_on_stdout(cli, tmp_path):
    result = cli("digest", "--json", str(tmp_path / "missing.bin"))

    assert result.code == 3
    assert '"code": "file_not_found"' in result.stdout


def test_malformed_setting_fails_before_any_command(cli):
    result = cli("digest", "--stdin", env={"REQUIEM_LOG_LEVEL": "loud"}, input=b"")

    assert result.code == 2
    assert result.stderr.startswith("requiem: error[config_error]: REQUIEM_LOG_LEVEL=")


def test_digest_stdin_matches_b3sum_of_the_same_bytes(cli):
    result = cli("digest", "--stdin", input=b"abc")

    assert result.code == 0
    assert result.stdout == (
        "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85\n"
    )


def test_digest_of_files_prints_b3sum_lines(cli, tmp_path):
    first = tmp_path / "a.txt"
    first.write_bytes(b"abc")

    result = cli("digest", str(first), str(first))

    line = (
        f"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85  {first}\n"
    )
    assert result.stdout == line * 2


def test_digest_without_input_is_a_usage_error(cli):
    result = cli("digest")

    assert result.code == 2
    assert "error[usage_error]" in result.stderr


def test_lazy_command_table_matches_what_modules_register():
    """Every module's commands are in the table, and the table names nothing else."""
    from requiem.cli.main import COMMAND_MODULES, module_commands

    registered = {}
    for module_name in set(COMMAND_MODULES.values()):
        for name in module_commands(module_name):
            registered[name] = module_name

    assert registered == COMMAND_MODULES


def test_a_light_command_does_not_import_the_database_layer(cli):
    """`requiem digest` stays quick: SQLAlchemy and the engine load only when used."""
    code = (
        "import sys; sys.argv = ['requiem', 'digest', '--stdin'];"
        "import requiem.cli.main as m\n"
        "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(n for n in ('sqlalchemy', 'alembic', 'requiem.engine') "
        "if n in sys.modules), file=sys.stderr)"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code], input=b"", capture_output=True, check=False
    )

    assert proc.stderr.decode().strip() == "[]"


def test_one_shot_commands_log_only_warnings_unless_asked(cli, tmp_path):
    quiet = cli("run", "--workspace", str(tmp_path), "--", "true")
    chatty = cli(
        "run",
        "--workspace",
        str(tmp_path),
        "--no-cache",
        "--",
        "true",
        env={"REQUIEM_LOG_LEVEL": "info"},
    )

    assert (quiet.code, chatty.code) == (0, 0)
    assert "engine.run" not in quiet.stderr
    assert "engine.run" in chatty.stderr
