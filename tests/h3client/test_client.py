"""``h3client.Client``'s HTTP stack: what it builds, against a real daemon."""

from __future__ import annotations

from h3client import Client
from tests.conftest import Daemon


def test_a_plain_http_daemon_costs_no_ca_bundle_and_https_keeps_verifying(
    daemon: Daemon, ca_loads: list[str]
) -> None:
    # building a verifying SSL context costs 34-52 ms of CPU: a profiler's sender did it on
    # its first post, for a daemon on plain http that never uses it
    with Client(daemon.url, daemon.token) as c:
        run = c.create_run(name="plain-http")  # real round trips
        assert c.get_run(run["id"])["name"] == "plain-http"
    assert ca_loads == []
    with Client("https://127.0.0.1:1", "t") as c:
        assert c.http is not None
    assert ca_loads, "an https daemon is reached with certificate verification"
