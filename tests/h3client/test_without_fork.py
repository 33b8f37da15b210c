"""On Windows: no ``os.register_at_fork``, ``os.fork``, ``os.getuid`` nor ``fcntl``. The client
imports, and a run without a daemon goes to its spool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

WINDOWS_LIKE = """
import os, sys
for name in ("register_at_fork", "fork", "getuid"):
    delattr(os, name)
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError
from h3client import H3Profiler
prof = H3Profiler("no-fork", url="http://127.0.0.1:9", data_dir=sys.argv[1], autostart=False)
prof.log_batch(0.5)
res = prof.stop()
print(res["offline"], res["batches_spooled"])
"""


def test_the_client_imports_and_runs_offline_where_os_has_no_fork(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", WINDOWS_LIKE, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "1"]
