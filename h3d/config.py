"""Daemon settings: constructor arguments, then ``H3D_*`` environment variables, then defaults.

A pydantic model that reads its own environment variables, the way pydantic-settings'
``BaseSettings(env_prefix="H3D_", extra="ignore")`` did (names case-insensitive, values
validated like constructor arguments, the same ``ValidationError`` for a bad one), without
importing pydantic-settings, which took 25 to 40 ms of CPU at every daemon start on top of
the pydantic that fastapi imports anyway (issue #12).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_PORT = 8421
ENV_PREFIX = "H3D_"


def default_data_dir() -> Path:
    """``$H3D_DATA_DIR``, else ``$XDG_DATA_HOME/h3d``, else ``~/.local/share/h3d``.

    A relative ``XDG_DATA_HOME`` is ignored, as the XDG Base Directory spec says: it named
    another directory from each working directory, where the daemon's clients did not look.
    """
    env = os.environ.get("H3D_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = Path(os.environ.get("XDG_DATA_HOME", "")).expanduser()
    base = xdg if xdg.is_absolute() else Path.home() / ".local" / "share"
    return base / "h3d"


def _environ(fields: Iterable[str]) -> dict[str, str]:
    """``H3D_<FIELD>`` for each field that has one; the names are case-insensitive.

    An empty variable is unset, as for ``H3D_DATA_DIR`` in :func:`default_data_dir` and for
    the client's variables: ``H3D_DATA_DIR=`` made the current directory the data dir, and
    ``H3D_HOST=`` bound every interface.
    """
    env = {k.lower(): v for k, v in os.environ.items() if v}
    prefix = ENV_PREFIX.lower()
    return {f: env[prefix + f] for f in fields if prefix + f in env}


class Settings(BaseModel):
    """Everything the daemon can be told. Build one in ``cli.main`` or a test fixture."""

    # validate_default: defaults go through the validators too (data_dir is expanded).
    # allow_inf_nan=False: no setting means anything with NaN or infinity, and several
    # crashed the daemon after it bound its port (H3D_IDLE_MIN_S=inf).
    model_config = ConfigDict(extra="ignore", validate_default=True, allow_inf_nan=False)

    data_dir: Path = Field(default_factory=default_data_dir)
    db_url: str | None = None  # default: sqlite file ``h3d.db`` in data_dir
    # This daemon's name in a store shared by many nodes: stamped on its devices, samples and
    # the runs and ranks it receives. Default: the host name.
    node: str = Field(default_factory=socket.gethostname, min_length=1, max_length=255)
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    sample_interval_s: float = Field(0.1, ge=0.01, le=60.0)
    flush_interval_s: float = Field(1.0, gt=0.0, le=60.0)
    # A device's idle baseline (for energy above idle) is the median of its power while no
    # run is active, once this many seconds of such samples exist: a few seconds would take
    # a busy start (a script importing torch before its run opens) for idle.
    idle_min_s: float = Field(30.0, ge=0.0)
    log_level: str = "INFO"
    auto_migrate: bool = True
    # Comma-separated backend families to probe: auto | estimated | constant:<watts> | none.
    power_backends: str = "auto"
    # The `estimated` CPU model: utilisation × TDP. None → 10 W per logical core (min 15 W).
    cpu_tdp_w: float | None = Field(None, gt=0.0)
    # Power samples keep full resolution while a run is active and for this long after
    # (and for this long when no run is active); older ones are thinned to one per bucket.
    power_full_resolution_s: float = Field(7 * 86400.0, gt=0.0)
    power_downsample_s: float = Field(10.0, gt=0.0)
    # Runs whose process is gone: failed after this long without a request (see h3d/reaper.py).
    run_exit_grace_s: float = Field(30.0, ge=0.0)
    run_timeout_s: float = Field(3600.0, gt=0.0)
    run_reap_every_s: float = Field(5.0, gt=0.0)
    # Host names (besides IP literals and localhost) the daemon answers to: a DNS-rebinding
    # guard. Comma-separated; "*" turns the check off. The bind host is always allowed.
    allowed_hosts: str = ""
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_batches_per_request: int = Field(50_000, gt=0)
    # Carbon (docs/power.md, "Carbon"): nothing set -> co2e_g is null, never a guess.
    carbon_intensity_g_per_kwh: float | None = Field(None, ge=0.0, le=5000.0)
    carbon_region: str | None = None  # a code of the shipped annual-average table, e.g. FR
    carbon_timeseries_csv: Path | None = None  # rows of time,g_per_kwh
    electricitymaps_token: str | None = None  # enables the `live` source
    carbon_zone: str | None = None  # Electricity Maps zone (default: carbon_region)
    carbon_live_url: str = "https://api.electricitymap.org"
    carbon_live_ttl_s: float = Field(900.0, gt=0.0)
    # The public URL once bound (set by `serve`; written to daemon.json).
    public_url: str | None = None

    def __init__(self, **values: Any) -> None:
        super().__init__(**{**_environ(type(self).model_fields), **values})

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r}")
        return v

    @field_validator("power_backends")
    @classmethod
    def _backends(cls, v: str) -> str:
        from h3d.power.select import parse_backends

        parse_backends(v)  # an unknown family is an error at start-up, before binding
        return v

    @field_validator("carbon_region")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from h3d.carbon import region

        region(v)  # an unknown code is an error at start-up, with the known codes
        return v.strip().upper()

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        from sqlalchemy.engine import URL  # the client-side commands never need SQLAlchemy

        path = str(self.data_dir / "h3d.db")
        try:
            path.encode()
        except UnicodeEncodeError:  # bytes kept as surrogates (os.fsdecode): a URL is text
            name = os.fsencode(self.data_dir).decode(errors="backslashreplace")
            raise ValueError(
                f"the data dir's name {name} is not valid UTF-8, so the default store in it "
                "(sqlite:///<data dir>/h3d.db) has no URL; use another data dir (--data-dir or "
                "H3D_DATA_DIR) or name the store (--db-url or H3D_DB_URL)"
            ) from None
        # Built, not pasted: a path holding "?", "#" or "%41" is no query string or escape
        # (a data dir "exp?a" put its store in "exp", shared with "exp?b").
        return URL.create("sqlite", database=path).render_as_string(hide_password=False)

    @property
    def host_names(self) -> list[str]:
        """Names the Host header may carry (see ``allowed_hosts``)."""
        names = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        if self.host not in ("0.0.0.0", "::", ""):
            names.append(self.host)
        else:  # every interface: this machine's own names too
            names += [socket.gethostname(), socket.getfqdn()]
        return names

    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    @property
    def daemon_file(self) -> Path:
        return self.data_dir / "daemon.json"
