"""Settings: constructor arguments, then H3D_* environment variables, then defaults."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from h3client._config import default_data_dir as client_default_data_dir
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
        ("H3D_CPU_TDP_W", "abc", "cpu_tdp_w\n  Input should be a valid number"),
        ("H3D_LOG_LEVEL", "loud", "unknown log level 'LOUD'"),
        ("H3D_AUTO_MIGRATE", "maybe", "auto_migrate\n  Input should be a valid boolean"),
        # checked here, not after the daemon bound its port (where they crashed it)
        ("H3D_POWER_BACKENDS", "rapl,nvmll", "unknown power backend 'rapl' (known: auto,"),
        ("H3D_POWER_BACKENDS", "auto,constant:abc", "'constant:abc': the watts of constant"),
        ("H3D_POWER_BACKENDS", "constant:-5", "'constant:-5': the watts of constant"),
        ("H3D_IDLE_MIN_S", "inf", "idle_min_s\n  Input should be a finite number"),
        ("H3D_CPU_TDP_W", "nan", "cpu_tdp_w\n  Input should be a finite number"),
        ("H3D_RUN_REAP_EVERY_S", "inf", "run_reap_every_s\n  Input should be a finite number"),
    ],
)
def test_a_bad_variable_is_a_validation_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, expect: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError, match="1 validation error for Settings") as info:
        Settings(data_dir=tmp_path)
    assert expect in str(info.value) and f"input_value={value!r}" in str(info.value)


def test_an_empty_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # as default_data_dir() and the client read theirs: H3D_DATA_DIR= made the current
    # directory the data dir, H3D_HOST= bound every interface
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    for var in ("H3D_DATA_DIR", "H3D_HOST", "H3D_PORT", "h3d_cpu_tdp_w", "H3D_DB_URL"):
        monkeypatch.setenv(var, "")
    s = Settings()
    assert s.data_dir == tmp_path / "xdg" / "h3d"
    assert (s.host, s.port, s.cpu_tdp_w, s.db_url) == ("127.0.0.1", 8421, None, None)


@pytest.mark.parametrize("name", ["exp?a", "x%41y", "hash#dir", "my data", "at@dir:1"])
def test_the_default_store_is_in_the_data_dir_whatever_its_name(tmp_path: Path, name: str) -> None:
    from sqlalchemy.engine import make_url

    from h3d.storage.engine import make_engine

    data = tmp_path / name
    data.mkdir()
    url = Settings(data_dir=data).database_url
    assert make_url(url).database == str(data / "h3d.db")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    engine.dispose()
    assert (data / "h3d.db").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing beside it ("exp", "xAy")


def test_the_power_backend_list_parser_is_the_one_the_daemon_builds_with() -> None:
    from h3d.power.select import build_backends, parse_backends

    spec = " auto, constant:50 ,,none,estimated"
    assert parse_backends(spec) == [
        ("auto", None),
        ("constant", 50.0),
        ("none", None),
        ("estimated", None),
    ]
    (b,) = build_backends("none,constant:2.5", cpu_tdp_w=None)
    assert (b.info.name, b.read().power_w) == ("constant:1", 2.5)
    with pytest.raises(ValueError, match="unknown power backend 'nvml'"):
        build_backends("nvml", cpu_tdp_w=None)


@pytest.mark.parametrize(
    "data_dir", [lambda: Settings().data_dir, client_default_data_dir], ids=["h3d", "h3client"]
)
def test_a_relative_xdg_data_home_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Callable[[], Path]
) -> None:
    # The XDG spec: a relative path there is invalid and ignored. Taken as it was, it named
    # another data dir from every working directory, where the clients found no daemon.
    monkeypatch.delenv("H3D_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", "xdgdata")
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "h3d"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "h3d"
