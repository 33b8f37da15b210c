"""Settings: constructor arguments, then H3D_* environment variables, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from h3d.config import Settings


def test_environment_then_defaults_and_arguments_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("H3D_PORT", "9001")
    monkeypatch.setenv("h3d_sample_interval_s", "0.05")  # names are case-insensitive
    monkeypatch.setenv("H3D_AUTO_MIGRATE", "false")
    monkeypatch.setenv("H3D_WRITE_OPENAPI", "1")  # not a setting: ignored
    s = Settings(data_dir=tmp_path, port=9002, no_such_setting=1)
    assert (s.port, s.sample_interval_s, s.auto_migrate) == (9002, 0.05, False)
    assert Settings(data_dir=tmp_path).port == 9001
    assert Settings(data_dir=tmp_path).max_body_bytes == 32 * 1024 * 1024


def test_defaults_go_through_the_validators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("H3D_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "~/xdg")
    assert Settings().data_dir == Path("~/xdg/h3d").expanduser()
    monkeypatch.setenv("H3D_LOG_LEVEL", "debug")
    assert Settings().log_level == "DEBUG"


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("H3D_PORT", "70000", "port\n  Input should be less than or equal to 65535"),
        ("H3D_CPU_TDP_W", "", "cpu_tdp_w\n  Input should be a valid number"),
        ("H3D_LOG_LEVEL", "loud", "unknown log level 'LOUD'"),
        ("H3D_AUTO_MIGRATE", "maybe", "auto_migrate\n  Input should be a valid boolean"),
    ],
)
def test_a_bad_variable_is_a_validation_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, expect: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match="1 validation error for Settings") as info:
        Settings(data_dir=tmp_path)
    assert expect in str(info.value) and f"input_value={value!r}" in str(info.value)
