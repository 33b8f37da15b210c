"""``import h3client`` is light: every training script pays it (budget: 50 ms over a bare
interpreter, measured by benchmarks/client_overhead.py). httpx is imported by the sender
thread when it first sends; torch and numpy only arrive with the tensors a caller passes."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_import_h3client_loads_no_http_stack_torch_or_numpy() -> None:
    probe = (
        "import json, sys, h3client\n"
        "h3client.H3Profiler, h3client.Client, h3client.EnergyTracker\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    mods = set(json.loads(r.stdout))
    assert "h3client" in mods
    assert mods.isdisjoint({"httpx", "httpcore", "h11", "anyio", "torch", "numpy", "h3d"})
