from __future__ import annotations

from pathlib import Path

import pytest

from meridio.settings import CommonSettings, SettingsError, load_settings, parse_flag_args


class RoleSettings(CommonSettings, kw_only=True):
    listen: str = "[::]:7777"
    entry_timeout: float = 60.0
    enabled: bool = False


def test_layers_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("listen: file:1\nentry-timeout: 5\nlog_level: debug\n")
    env = {"MERIDIOD_LISTEN": "env:2", "MERIDIOD_ENTRY_TIMEOUT": "7.5", "HOME": "/x"}
    got = load_settings(RoleSettings, file=str(cfg), environ=env, flags={"listen": "flag:3"})
    assert got.listen == "flag:3"
    assert got.entry_timeout == 7.5
    assert got.log_level == "debug"
    assert got.enabled is False
    assert load_settings(RoleSettings, environ={}).listen == "[::]:7777"


def test_unknown_setting_names_key_and_source(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("lisen: x\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'lisen' \(key 'lisen' in config"):
        load_settings(RoleSettings, file=str(cfg), environ={})
    with pytest.raises(SettingsError, match="environment variable MERIDIOD_NOPE"):
        load_settings(RoleSettings, environ={"MERIDIOD_NOPE": "1"})


def test_ill_typed_setting_names_key_and_source() -> None:
    with pytest.raises(SettingsError, match=r"'entry-timeout' \(flag --entry-timeout\).*float"):
        load_settings(RoleSettings, environ={}, flags={"entry-timeout": "soon"})


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(RoleSettings, file=str(tmp_path / "missing.yaml"), environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(SettingsError, match="not valid YAML at line"):
        load_settings(RoleSettings, file=str(bad), environ={})


def test_reserved_environment_is_not_a_setting() -> None:
    got = load_settings(RoleSettings, environ={"MERIDIOD_ROLE": "nsp", "MERIDIOD_CONFIG": "/x"})
    assert got.listen == "[::]:7777"


def test_flag_parsing_forms() -> None:
    assert parse_flag_args(["--a=1", "--b", "2", "--enabled", "--no-x"]) == {
        "a": "1",
        "b": "2",
        "enabled": "true",
        "x": "false",
    }
    with pytest.raises(SettingsError, match="unexpected argument"):
        parse_flag_args(["positional"])
