from __future__ import annotations

from typing import Any

from h3d.api._routes import Routes
from h3d.api.deps import SamplerDep, SettingsDep, StoreDep
from h3d.storage import repository as repo

router = Routes(tags=["system"])


@router.get("/devices")
def get_devices(store: StoreDep, settings: SettingsDep, sampler: SamplerDep) -> dict[str, Any]:
    """This node's devices (a store shared by many nodes holds theirs too)."""
    live = {d.backend.info.name: d for d in sampler.devices} if sampler else {}
    stats = sampler.stats() if sampler else None
    with store.read() as s:
        stored = repo.devices(s, nodes=[settings.node])
    out = []
    for dev in stored:
        d = live.get(dev.name)
        info = d.backend.info if d else None
        status, reason = (d.status, d.reason) if d else ("absent", None)
        if d is not None and stats is not None and status == "ok":
            # Read fine but not recorded: say so, or energy would silently go wrong.
            if not stats["running"]:
                status, reason = "stopped", "the sampler thread is not running"
            elif stats["storage"]["status"] != "ok":
                st = stats["storage"]
                status = "degraded"
                reason = (
                    f"readings are not being stored ({st['reason']}); {st['unstored_rows']} "
                    f"held in memory, {st['dropped_rows']} dropped (gaps in energy)"
                )
            elif stats["storage"]["dropped_rows"]:
                st = stats["storage"]
                reason = f"{st['dropped_rows']} readings could not be stored earlier (gaps)"
        out.append(
            {
                "node": dev.node,
                "name": dev.name,
                "kind": dev.kind,
                "source": dev.source,
                "model": dev.model,
                "uuid": dev.uuid,
                "active": d is not None,
                "status": status,
                "reason": reason if d else "not present since the daemon started",
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
        "sampler": stats,
    }
