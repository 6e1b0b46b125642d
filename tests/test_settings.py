"""The settings table: typed values, clear errors, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from requiem import settings
from requiem.errors import ConfigError


def test_defaults_put_everything_under_requiem_home(tmp_path):
    config = settings.load({"REQUIEM_HOME": str(tmp_path)})

    assert config.home == tmp_path
    assert config.cas_dir == tmp_path / "cas"
    assert config.database_url == f"sqlite:///{tmp_path / 'requiem.db'}"
    assert config.profile == "development"
    assert config.int("REQUIEM_PORT") == 8080


def test_explicit_cas_dir_wins(tmp_path):
    config = settings.load(
        {"REQUIEM_HOME": str(tmp_path), "REQUIEM_CAS_DIR": "/data/cas"}
    )

    assert config.cas_dir == Path("/data/cas")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REQUIEM_PORT", "eighty"),
        ("REQUIEM_ENV", "prod"),
        ("REQUIEM_ALLOW_SQLITE_IN_PRODUCTION", "maybe"),
        ("REQUIEM_URL", "not a url"),
    ],
)
def test_malformed_values_raise_config_error_naming_the_setting(name, value):
    config = settings.load({name: value})

    with pytest.raises(ConfigError) as caught:
        config.get(name)
    assert caught.value.code == "config_error"
    assert name in caught.value.message


def test_a_malformed_secret_is_never_echoed():
    config = settings.load({"DATABASE_URL": "hunter2-not-a-url"})

    with pytest.raises(ConfigError) as caught:
        config.get("DATABASE_URL")
    assert "hunter2" not in caught.value.message


def test_unknown_requiem_variables_are_reported_as_typos():
    environ = {"REQUIEM_HOEM": "/x", "REQUIEM_HOME": "/y", "REQUIEM_TEST_FOO": "1"}

    assert settings.unknown_names(environ) == ["REQUIEM_HOEM"]


def test_every_setting_is_documented_and_typed():
    for setting in settings.TABLE:
        assert setting.help, setting.name
        assert setting.kind in {"str", "int", "float", "bool", "path", "url", "choice"}
        if setting.kind == "choice":
            assert setting.default in setting.choices
