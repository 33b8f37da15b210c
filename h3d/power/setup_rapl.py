"""``h3d setup-rapl``: RAPL without running the daemon as root.

Since CVE-2020-8694 (PLATYPUS) kernels make ``energy_uj`` root-only, because a fast energy
reading is a side channel. Instead of root, one group gets read access to ``energy_uj`` and
``max_energy_range_uj`` and the daemon runs with that group. Printed by default; with
``--apply`` (as root) the files are installed and the current counters re-permissioned.
Who is in the group can read the side channel: keep it to the daemon's user.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UDEV_RULE = "etc/udev/rules.d/90-h3-rapl.rules"
TMPFILES = "etc/tmpfiles.d/h3-rapl.conf"
UNIT = "etc/systemd/system/h3d.service"
FILES = ("energy_uj", "max_energy_range_uj")


@dataclass(frozen=True)
class Plan:
    group: str
    user: str
    h3d: str

    def udev(self) -> str:
        paths = " ".join(f"/sys%p/{f}" for f in FILES)
        return (
            f"# h3: group {self.group} may read the RAPL energy counters (root-only since\n"
            "# CVE-2020-8694). Installed by `h3d setup-rapl --apply`.\n"
            f'SUBSYSTEM=="powercap", ACTION=="add", '
            f'RUN+="/bin/chgrp {self.group} {paths}", RUN+="/bin/chmod g+r {paths}"\n'
        )

    def tmpfiles(self) -> str:
        lines = [
            f"# h3: the same as {UDEV_RULE}, for systems that prefer systemd-tmpfiles",
            "# (applied at boot; zones of a driver loaded later need the udev rule)",
        ]
        for zone in ("intel-rapl:*", "intel-rapl:*:*"):
            for f in FILES:
                lines.append(f"z /sys/class/powercap/{zone}/{f} 0440 root {self.group} -")
        return "\n".join(lines) + "\n"

    def unit(self) -> str:
        return (
            "[Unit]\n"
            "Description=H3 energy daemon (h3d)\n"
            "After=network.target systemd-udev-settle.service\n\n"
            "[Service]\n"
            f"User={self.user}\n"
            f"SupplementaryGroups={self.group}\n"
            f"ExecStart={self.h3d} serve\n"
            "Restart=on-failure\n"
            "NoNewPrivileges=true\n\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )


def _h3d_path() -> str:
    return shutil.which("h3d") or f"{sys.executable} -m h3d"


def render(plan: Plan) -> str:
    return (
        f"# 1. /{UDEV_RULE}\n{plan.udev()}\n"
        f"# 1b. or /{TMPFILES}\n{plan.tmpfiles()}\n"
        f"# 2. /{UNIT}\n{plan.unit()}\n"
        f"# then: sudo groupadd --system {plan.group}; "
        "sudo udevadm control --reload; sudo udevadm trigger --subsystem-match=powercap;\n"
        "#       sudo systemctl daemon-reload; sudo systemctl enable --now h3d\n"
        f"# or all of it: sudo h3d setup-rapl --apply --group {plan.group} --user {plan.user}\n"
    )


def apply(plan: Plan, *, root: Path = Path("/")) -> list[str]:
    """Install the rule, the tmpfiles snippet and the unit under ``root``; give the group
    read access to the counters there now. Returns what was done, one line each."""
    done: list[str] = []
    try:
        gid = grp.getgrnam(plan.group).gr_gid
    except KeyError:
        if root != Path("/"):
            raise
        subprocess.run(["groupadd", "--system", plan.group], check=True)
        gid = grp.getgrnam(plan.group).gr_gid
        done.append(f"created group {plan.group}")
    for rel, text in ((UDEV_RULE, plan.udev()), (TMPFILES, plan.tmpfiles()), (UNIT, plan.unit())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o644)
        done.append(f"wrote {path}")
    powercap = root / "sys/class/powercap"
    for zone in sorted(powercap.glob("intel-rapl:*")):
        for f in FILES:
            p = zone / f
            if p.exists():
                os.chown(p, -1, gid)
                p.chmod(p.stat().st_mode | 0o040)
                done.append(f"{p}: group {plan.group} may read")
    if root == Path("/") and shutil.which("udevadm"):
        subprocess.run(["udevadm", "control", "--reload"], check=False)
        done.append("udev rules reloaded")
    done.append("next: `systemctl daemon-reload && systemctl enable --now h3d`")
    return done


def main(*, group: str, user: str | None, do_apply: bool, root: Path = Path("/")) -> int:
    plan = Plan(group=group, user=user or os.environ.get("SUDO_USER") or "h3d", h3d=_h3d_path())
    if not do_apply:
        print(render(plan), end="")
        return 0
    if os.geteuid() != 0 and root == Path("/"):
        print("h3d setup-rapl --apply must run as root (sudo); without --apply it only prints")
        return 2
    try:
        for line in apply(plan, root=root):
            print(line)
    except (KeyError, OSError, subprocess.CalledProcessError) as exc:
        print(f"h3d setup-rapl: {exc}", file=sys.stderr)
        return 1
    return 0
