"""AMD GPUs through ``amdsmi`` (ROCm >= 6; the Python bindings from PyPI, imported lazily).

Per device, in order of preference:

- ``amdsmi_counter``: ``amdsmi_get_energy_count`` — ``energy_accumulator`` ticks of
  ``counter_resolution`` µJ each (the key is ``power`` in the bindings before ROCm 6.3).
  Read as a counter: a value that steps backwards is a wrap (at 2**32 on firmware with a
  32-bit accumulator, else at 2**64) when the wrapped difference is a plausible energy, and
  a reset (re-based, nothing counted) when it is not.
- ``amdsmi_power_current`` / ``amdsmi_power_average``: ``amdsmi_get_power_info``'s
  ``current_socket_power`` (MI300 and newer) or ``average_socket_power`` (MI200), in W.
  A field the GPU cannot report is "N/A" (the bindings' word for 0xFFFF) or 4294967295
  (the library's UINT32_MAX, which the bindings pass through): neither is read as 0 W, nor
  as 4.29 GW.

Start-up checks, each logged and labelled rather than hidden:

- **plausibility**: the counter's power over a short window is compared with the socket
  power measured over the same window, as Zeus does. A counter off by more than
  :data:`PLAUSIBLE_RATIO` (a wrong resolution once made a GPU read "12.5 MW") is dropped for
  polled power, with the reason in ``DeviceInfo.note``. A "not available" marker is never
  the measured side of that comparison.
- **VM guests** (``amdsmi_get_gpu_virtualization_mode`` = GUEST): no energy counter is read
  there; polled power only, if the guest sees any.
- **MI250 / MI250X**: the two dies (GCDs) of one OAM module share one power figure, which
  only one of them reports; the other reports 0 W. The pair becomes one device, read from
  the die that reports, named after both; the silent die is never shown as a 0 W device.

``ROCR_VISIBLE_DEVICES`` then ``HIP_VISIBLE_DEVICES`` (or ``CUDA_VISIBLE_DEVICES``, which HIP
also honours) select devices as the ROCm runtime does. Every amdsmi error is translated
once, here, into :class:`PowerBackendError`; a GPU that is found but cannot be read is
absent with its reason (``h3d doctor``), not "no device found".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from h3d.power.base import (
    MAX_PLAUSIBLE_W,
    DeviceInfo,
    PowerBackendError,
    PowerReading,
    counter_step,
)

logger = logging.getLogger(__name__)

#: A counter whose power differs from the measured socket power by more than this factor
#: (either way) is not trusted.
PLAUSIBLE_RATIO = 2.0
#: Below this many watts of difference the ratio test is not applied (idle noise).
PLAUSIBLE_SLACK_W = 15.0

# amdsmi_status_t values (amdsmi_wrapper.AMDSMI_STATUS_*) worth a human reason.
_REASONS = {
    2: "not supported by this GPU, driver or firmware",
    10: "permission denied (run as a user in the render and video groups)",
    18: "amdsmi failed to initialise (is the amdgpu driver loaded?)",
    31: "no such device",
    34: "the amdgpu driver is not loaded",
}
NOT_SUPPORTED = 2


def import_amdsmi() -> ModuleType:
    try:
        # the bindings print a hint to stdout when libamd_smi.so is missing; keep it out of
        # the daemon's output (the reason below says the same)
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi
    except (Exception, SystemExit) as exc:
        if isinstance(exc, KeyError | OSError) and "amd_smi" in str(exc):
            raise PowerBackendError(
                "libamd_smi.so is not installed (the amdsmi bindings need ROCm's amd-smi-lib)"
            ) from exc
        raise PowerBackendError(
            f"amdsmi is not importable ({type(exc).__name__}: {exc}); "
            "install it with `pip install 'h3[amd]'` (and ROCm >= 6)"
        ) from exc
    module: ModuleType = amdsmi
    return module


def translate(smi: ModuleType, exc: BaseException, what: str) -> PowerBackendError:
    code = getattr(exc, "err_code", None)
    reason = _REASONS.get(code, str(exc).replace("\n\t", " ") or type(exc).__name__)  # type: ignore[arg-type]
    return PowerBackendError(f"{what}: {reason}")


def _watts(v: Any) -> float | None:
    """A power field in W: None for "N/A", for anything not a number, and for what no GPU
    draws (above MAX_PLAUSIBLE_W): the library's not-supported markers 0xFFFF and UINT32_MAX
    (amdsmi.h: "Unsupported struct members are set to UINT32_MAX"; the bindings turn only
    0xFFFF into "N/A", so 4294967295 reaches Python)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not v <= MAX_PLAUSIBLE_W:
        return None
    return float(v)


def _accumulator(count: Mapping[str, Any]) -> Any:
    """The ticks of ``amdsmi_get_energy_count``: ``energy_accumulator``, or ``power`` in the
    bindings before ROCm 6.3 (6.3 returns both)."""
    return count.get("energy_accumulator", count.get("power"))


def _select(selectors: str, order: list[int], ids: Sequence[Sequence[str]]) -> list[int]:
    """Apply one ``*_VISIBLE_DEVICES`` value to the current ``order`` (as the runtime does:
    indices into what is visible so far, or ``GPU-<id>`` prefixes; stop at the first invalid)."""
    out: list[int] = []
    for s in (s.strip() for s in selectors.split(",")):
        if s.isdigit() and int(s) < len(order):
            out.append(order[int(s)])
        elif s.upper().startswith("GPU-") and len(s) > 4:
            want = s[4:].lower().removeprefix("0x").lstrip("0")
            hit = [i for i in order if any(x.startswith(want) for x in ids[i] if x)]
            if not hit:
                break
            out.extend(h for h in hit if h not in out)
        else:
            break
    return out


def visible(n: int, ids: Sequence[Sequence[str]], env: Mapping[str, str]) -> list[int]:
    """Indices (in HIP order) of the GPUs the ROCm runtime would show this process."""
    order = list(range(n))
    rocr = env.get("ROCR_VISIBLE_DEVICES")
    if rocr is not None:
        order = _select(rocr, order, ids)
    hip = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    if hip is not None:
        order = _select(hip, order, ids)
    return order


def _norm_id(v: str) -> str:
    return v.lower().removeprefix("0x").lstrip("0")


@dataclass
class Die:
    """What amdsmi says about one GPU handle (one die of an MI250, or a whole GPU)."""

    handle: Any
    index: int
    uuid: str
    model: str
    serial: str
    pair_key: str | None  # the OAM module shared with a sibling die (MI250/MI250X), or None
    guest: bool
    hip_id: int | None = None
    ids: list[str] = field(default_factory=list)


def _describe(smi: ModuleType, handle: Any, index: int) -> Die:
    try:
        uuid = str(smi.amdsmi_get_gpu_device_uuid(handle))
        asic = smi.amdsmi_get_gpu_asic_info(handle)
    except smi.AmdSmiLibraryException as exc:
        raise translate(smi, exc, f"AMD GPU {index}") from exc
    model = str(asic.get("market_name", "AMD GPU"))
    serial = str(asic.get("asic_serial", "N/A"))
    pair_key = None
    if "MI250" in model.upper():
        oam = asic.get("oam_id", "N/A")
        board = "N/A"
        with contextlib.suppress(smi.AmdSmiLibraryException):
            board = str(smi.amdsmi_get_gpu_board_info(handle).get("product_serial", "N/A"))
        if oam != "N/A":
            pair_key = f"oam:{oam}"
        elif board != "N/A":
            pair_key = f"board:{board}"
    guest = False
    mode_fn = getattr(smi, "amdsmi_get_gpu_virtualization_mode", None)  # amdsmi >= 6.4
    if mode_fn is not None:
        with contextlib.suppress(smi.AmdSmiLibraryException):
            mode = mode_fn(handle).get("mode")
            guest = getattr(mode, "name", str(mode)) == "GUEST"
    hip_id = None
    with contextlib.suppress(Exception):  # amdsmi >= 6.4; "N/A" on older kernels
        h = smi.amdsmi_get_gpu_enumeration_info(handle).get("hip_id")
        hip_id = h if isinstance(h, int) else None
    ids = [_norm_id(serial) if serial != "N/A" else "", uuid.lower()]
    return Die(handle, index, uuid, model, serial, pair_key, guest, hip_id, ids)


class AmdGpu:
    """One AMD GPU, or one MI250 OAM module (both dies, counted once)."""

    def __init__(
        self,
        smi: ModuleType,
        dies: list[Die],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.smi = smi
        self.dies = dies
        self._clock = clock
        self._reporting = dies[0]
        self._has_counter = False
        self._power_key: str | None = None
        self.note = ""
        if len(dies) > 1:
            self._reporting = self._pick_reporting_die()
        die = self._reporting
        if die.guest:
            self.note = "VM guest: the energy counter is not read inside a guest"
        else:
            self._has_counter = self._try(self._raw_counter) is not None
        info = self._try(lambda: smi.amdsmi_get_power_info(die.handle)) or {}
        for key in ("current_socket_power", "average_socket_power"):
            if _watts(info.get(key)) is not None:
                self._power_key = key
                break
        if not self._has_counter and self._power_key is None:
            why = "VM guest: no energy counter there" if die.guest else "no energy counter"
            raise PowerBackendError(
                f"AMD GPU {die.index} ({die.model}): {why} and no socket power "
                "(amdsmi_get_power_info fields are N/A)"
            )
        self._last_raw: int | None = None
        self._last_t: float | None = None
        self._total_uj = 0.0
        self._last_w: float | None = None
        self._proc_since: int | None = None
        self._proc_prev: dict[int, int] = {}
        self._proc_cur: dict[int, int] = {}
        limit_w = _watts(info.get("power_limit"))
        self.info = DeviceInfo(
            name=f"amdsmi:{die.uuid}",
            kind="gpu",
            source=self.source,
            model=self._model(),
            uuid=die.uuid,
            index=die.index,
            power_limit_w=limit_w,
            note=self.note,
        )

    @property
    def source(self) -> str:
        if self._has_counter:
            return "amdsmi_counter"
        return (
            "amdsmi_power_current"
            if self._power_key == "current_socket_power"
            else ("amdsmi_power_average")
        )

    def _model(self) -> str:
        if len(self.dies) == 1:
            return self.dies[0].model
        gcds = "+".join(str(d.index) for d in self.dies)
        return f"{self.dies[0].model} (GCDs {gcds}: one OAM, its power counted once)"

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (self.smi.AmdSmiLibraryException, KeyError, TypeError):
            return None  # unsupported here, or a bindings release shaped otherwise

    def _pick_reporting_die(self) -> Die:
        """The die of an MI250 pair that reports the pair's power (the other reads 0 W)."""
        for d in self.dies:
            info = self._try(functools.partial(self.smi.amdsmi_get_power_info, d.handle)) or {}
            watts = [_watts(info.get(k)) for k in ("current_socket_power", "average_socket_power")]
            if any(w for w in watts if w):
                return d
            count = self._try(functools.partial(self.smi.amdsmi_get_energy_count, d.handle))
            if count and _accumulator(count):
                return d
        names = ", ".join(str(d.index) for d in self.dies)
        raise PowerBackendError(f"AMD MI250 GCDs {names}: neither die reports power (0 W on both)")

    def _raw_counter(self) -> tuple[int, float]:
        c = self.smi.amdsmi_get_energy_count(self._reporting.handle)
        acc, res = _accumulator(c), c.get("counter_resolution")
        if not isinstance(acc, int) or not isinstance(res, int | float) or res <= 0:
            raise self.smi.AmdSmiLibraryException(NOT_SUPPORTED)
        return int(acc), float(res)

    def _power_w(self) -> float | None:
        if self._power_key is None:
            return None
        info = self.smi.amdsmi_get_power_info(self._reporting.handle)
        return _watts(info.get(self._power_key))

    def use_power(self, reason: str) -> None:
        """Drop the counter for polled power (the plausibility check failed)."""
        if self._power_key is None:
            raise PowerBackendError(f"{self.info.name}: {reason}; and no socket power to use")
        self._has_counter = False
        self.note = reason
        self.info = dataclasses.replace(self.info, source=self.source, note=reason)
        logger.warning("%s: %s; using %s", self.info.name, reason, self.source)

    def read(self) -> PowerReading:
        try:
            power = self._power_w()
            if not self._has_counter:
                if power is None:
                    raise PowerBackendError(f"{self.info.name}: {self._power_key} is N/A")
                return PowerReading(power_w=power)
            raw, res = self._raw_counter()
        except self.smi.AmdSmiLibraryException as exc:
            raise translate(self.smi, exc, self.info.name) from exc
        t = self._clock()
        last = self._last_raw
        if last is not None and self._last_t is not None:
            ticks = counter_step(
                self.info.name,
                last,
                raw,
                wrap_at=2**32 if last < 2**32 else 2**64,  # 32-bit accumulator on some firmware
                uj_per_unit=res,
                dt_s=t - self._last_t,
            )
            self._total_uj += ticks * res
        self._last_raw, self._last_t = raw, t
        return PowerReading(power_w=power, energy_j=self._total_uj / 1e6)

    def process_share(self, pids: set[int], since_us: int = 0) -> float | None:
        """The pids' share of the GFX engine time used on this GPU (or pair) since the
        previous sampling interval, from ``amdsmi_get_gpu_process_list``."""
        if since_us != self._proc_since:  # one snapshot per interval, shared by every run
            cur: dict[int, int] = {}
            for d in self.dies:
                procs = self._try(functools.partial(self.smi.amdsmi_get_gpu_process_list, d.handle))
                if procs is None:
                    return None
                for p in procs:
                    gfx = p.get("engine_usage", {}).get("gfx")
                    if isinstance(gfx, int):
                        cur[int(p["pid"])] = cur.get(int(p["pid"]), 0) + gfx
            self._proc_prev, self._proc_cur, self._proc_since = self._proc_cur, cur, since_us
        prev, cur = self._proc_prev, self._proc_cur
        deltas = {pid: max(0, v - prev.get(pid, v)) for pid, v in cur.items() if pid in prev}
        total = sum(deltas.values())
        if total <= 0:
            return None
        return min(1.0, sum(v for pid, v in deltas.items() if pid in pids) / total)

    def close(self) -> None:
        pass


def check_plausible(gpus: Sequence[AmdGpu], window_s: float = 0.25) -> None:
    """Compare each counter's power over ``window_s`` with the measured socket power; drop
    counters that disagree (all GPUs checked in one window)."""
    checked = [g for g in gpus if g._has_counter and g._power_key is not None]
    if not checked or window_s <= 0:
        return
    start: list[tuple[int, float, float] | None] = []
    for g in checked:
        c = g._try(g._raw_counter)
        start.append((c[0], c[1], g._clock()) if c else None)
    powers: list[list[float]] = [[] for _ in checked]
    deadline = time.monotonic() + window_s
    while True:
        for i, g in enumerate(checked):
            w = g._try(g._power_w)
            if w is not None:
                powers[i].append(w)
        if time.monotonic() >= deadline:
            break
        time.sleep(min(0.02, window_s / 5))
    for g, s, ws in zip(checked, start, powers, strict=True):
        c = g._try(g._raw_counter)
        if s is None or c is None or not ws:
            continue
        dt = g._clock() - s[2]
        if dt <= 0 or c[0] < s[0]:
            continue
        counter_w = (c[0] - s[0]) * c[1] / 1e6 / dt
        measured_w = sum(ws) / len(ws)
        lo, hi = sorted((counter_w, measured_w))
        if hi - lo > PLAUSIBLE_SLACK_W and (lo <= 0 or hi / lo > PLAUSIBLE_RATIO):
            g.use_power(
                f"energy counter implausible at start-up: {_si_w(counter_w)} from the "
                f"counter vs {_si_w(measured_w)} measured"
            )


def _si_w(w: float) -> str:
    for unit, scale in (("MW", 1e6), ("kW", 1e3)):
        if abs(w) >= scale:
            return f"{w / scale:.3g} {unit}"
    return f"{w:.3g} W"


def discover(
    env: Mapping[str, str] | None = None,
    *,
    check_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> list[AmdGpu]:
    """Every visible AMD GPU (MI250 pairs as one). Raises PowerBackendError when amdsmi is
    unusable, or when GPUs were found and none of them can be read (with every reason)."""
    smi = import_amdsmi()
    try:
        smi.amdsmi_init(smi.AmdSmiInitFlags.INIT_AMD_GPUS)
        handles = list(smi.amdsmi_get_processor_handles())
    except smi.AmdSmiLibraryException as exc:
        raise translate(smi, exc, "amdsmi") from exc
    errors: list[str] = []

    def rejected(index: int, exc: Exception) -> None:
        if not isinstance(exc, PowerBackendError):  # the bindings returned another shape
            exc = PowerBackendError(
                f"AMD GPU {index}: unexpected amdsmi output ({type(exc).__name__}: {exc})"
            )
        errors.append(str(exc))

    dies: list[Die] = []
    for i, h in enumerate(handles):
        try:
            dies.append(_describe(smi, h, i))
        except (PowerBackendError, KeyError, TypeError) as exc:
            rejected(i, exc)
    if all(d.hip_id is not None for d in dies):
        dies.sort(key=lambda d: d.hip_id or 0)
    shown = {
        dies[i].index
        for i in visible(len(dies), [d.ids for d in dies], os.environ if env is None else env)
    }
    groups: dict[str, list[Die]] = {}
    for d in dies:
        groups.setdefault(d.pair_key or f"die:{d.index}", []).append(d)
    gpus: list[AmdGpu] = []
    for members in groups.values():
        if not any(d.index in shown for d in members):
            continue
        try:
            gpus.append(AmdGpu(smi, members, clock=clock))
        except (PowerBackendError, KeyError, TypeError) as exc:
            rejected(members[0].index, exc)
    if not gpus and errors:
        raise PowerBackendError("; ".join(errors))
    for err in errors:  # some GPUs work: the rest is worth one line each, not a failure
        logger.warning("AMD GPU skipped: %s", err)
    check_plausible(gpus, check_s)
    return gpus
