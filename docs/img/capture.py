"""Make ``docs/img/dashboard.png`` from a real run: ``make screenshot``.

It runs ``h3d demo`` on a fresh data dir (a real daemon on its SQLite default and a real
training run on scikit-learn's digits, measured by whatever power backend this machine has),
opens the run page in Debian's Chromium through Playwright and saves its top as the README's
figure. The daemon is stopped afterwards. Needs ``chromium`` (``make browser``) and the
``dev`` extra (playwright).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboard.png"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--height", type=int, default=1250, help="pixels of the page kept")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (`make browser` installs it as root)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="h3-shot-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("H3D_")}
        demo = subprocess.run(
            [sys.executable, "-m", "h3d", "demo", "--data-dir", tmp, "--epochs", str(args.epochs)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        print(demo.stdout)
        try:
            m = re.search(r"^browse: (\S+)", demo.stdout, re.M)
            if demo.returncode != 0 or m is None:
                print("the demo failed: no run page to capture", file=sys.stderr)
                return 1
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
                )
                page = browser.new_page(viewport={"width": 1360, "height": args.height})
                page.goto(m.group(1))
                for chart in ("#chart-loss-time", "#chart-loss-energy", "#chart-eta"):
                    page.wait_for_selector(f"{chart} path.series", state="attached")
                page.wait_for_selector("#chart-power-0 path.series", state="attached")
                time.sleep(0.5)  # the last chart's layout
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            subprocess.run(
                [sys.executable, "-m", "h3d", "stop", "--data-dir", tmp],
                env=env,
                check=False,
            )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
