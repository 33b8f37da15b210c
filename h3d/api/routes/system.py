from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from h3d.api.deps import SamplerDep, SessionDep, SettingsDep
from h3d.storage import repository as repo

router = APIRouter(tags=["system"])


@router.get("/devices")
def get_devices(session: SessionDep, settings: SettingsDep, sampler: SamplerDep) -> dict[str, Any]:
    """This node's devices (a store shared by many nodes holds theirs too)."""
    live = {d.backend.info.name: d for d in sampler.devices} if sampler else {}
    out = []
    for dev in repo.devices(session, nodes=[settings.node]):
        d = live.get(dev.name)
        info = d.backend.info if d else None
        out.append(
            {
                "node": dev.node,
                "name": dev.name,
                "kind": dev.kind,
                "source": dev.source,
                "model": dev.model,
                "uuid": dev.uuid,
                "active": d is not None,
                "status": (d.status if d else "absent"),
                "reason": d.reason if d else "not present since the daemon started",
                "granularity_s": info.granularity_s if info else None,
                "power_limit_w": info.power_limit_w if info else None,
                "note": info.note if info else "",
                "last_t": d.last_t if d else None,
                "last_power_w": d.last_power_w if d else None,
                "errors": d.errors if d else 0,
            }
        )
    return {
        "devices": out,
        "source": "none" if not live else None,
        "sampler": sampler.stats() if sampler else None,
    }
