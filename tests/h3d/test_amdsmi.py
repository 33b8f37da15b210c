from __future__ import annotations

import ast
import importlib.util
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from h3d.power import amdsmi as amd
from h3d.power import detect
from h3d.power.base import PowerBackendError
from tests.h3d import fake_amdsmi as fk
from tests.h3d.fake_amdsmi import FakeAmdGpu

Install = Callable[..., types.ModuleType]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _gpu(uuid: str = "a", clock: Clock | None = None, **kw: object) -> FakeAmdGpu:
    return FakeAmdGpu(uuid=uuid, clock=clock or Clock(), **kw)  # type: ignore[arg-type]


def test_counter_energy_is_accumulator_times_resolution(fake_amdsmi: Install) -> None:
    clk = Clock()
    g = _gpu(clock=clk, power_w=200.0)
    fake_amdsmi([g])
    (dev,) = amd.discover(env={}, check_s=0, clock=clk)
    assert dev.info.source == "amdsmi_counter"
    assert dev.info.name == "amdsmi:a" and dev.info.power_limit_w == 300.0
    assert dev.read().energy_j == 0.0
    clk.t += 10.0
    r = dev.read()
    assert r.energy_j == pytest.approx(2000.0, abs=2e-5)  # one tick of 15.259 µJ
    assert r.power_w == 200.0


def test_a_32_bit_accumulator_that_wraps_is_followed(fake_amdsmi: Install) -> None:
    clk = Clock()
    g = _gpu(clock=clk, power_w=100.0, acc_bits=32)
    fake_amdsmi([g])
    (dev,) = amd.discover(env={}, check_s=0, clock=clk)
    g.set_ticks(2**32 - 1000)
    dev.read()
    clk.t += 1.0  # 100 J = 6.55 M ticks: past 2**32
    r = dev.read()
    assert g.ticks() < 2**32 - 1000  # the raw counter did wrap
    assert r.energy_j == pytest.approx(100.0, abs=1e-4)


def test_a_counter_reset_is_rebased_not_counted(fake_amdsmi: Install) -> None:
    clk = Clock()
    g = _gpu(clock=clk, power_w=100.0)
    fake_amdsmi([g])
    (dev,) = amd.discover(env={}, check_s=0, clock=clk)
    g.set_ticks(2**40)
    dev.read()
    clk.t += 1.0
    e1 = dev.read().energy_j
    g.set_ticks(5)  # driver reload: far from any wrap point
    clk.t += 1.0
    assert dev.read().energy_j == e1
    clk.t += 1.0
    assert dev.read().energy_j == pytest.approx((e1 or 0) + 100.0, abs=1e-4)


@pytest.mark.parametrize("unsupported", [fk.UINT16_NA, fk.UINT32_NA])
def test_na_power_fields_are_never_zero_watts(fake_amdsmi: Install, unsupported: int) -> None:
    # "N/A" (0xFFFF) or 4294967295 (UINT32_MAX, which the bindings pass through): not a figure
    kw: dict[str, object] = {"counter": False, "unsupported": unsupported}
    # MI200: current_socket_power is not available, the average is read
    fake_amdsmi([_gpu(current=False, average=True, power_w=150.0, **kw)])
    (dev,) = amd.discover(env={}, check_s=0)
    assert dev.info.source == "amdsmi_power_average"
    assert dev.read().power_w == 150.0 and dev.read().energy_j is None
    # MI300: the current power is preferred
    fake_amdsmi([_gpu(current=True, average=False, power_w=400.0, **kw)])
    (dev,) = amd.discover(env={}, check_s=0)
    assert dev.info.source == "amdsmi_power_current"
    assert dev.read().power_w == 400.0
    # neither available and no counter: not a device at all, with the reason
    fake_amdsmi([_gpu(current=False, average=False, **kw)])
    with pytest.raises(PowerBackendError, match="no energy counter and no socket power"):
        amd.discover(env={}, check_s=0)


def test_uint32_max_current_power_never_overrules_a_good_counter(fake_amdsmi: Install) -> None:
    # an MI210 on amdsmi 7.0: current_socket_power unsupported arrives as 4294967295; the
    # start-up check must compare the counter with the average (250 W), not with 4.29 GW
    fake_amdsmi([FakeAmdGpu(uuid="a", power_w=250.0, unsupported=fk.UINT32_NA)])
    (dev,) = amd.discover(env={}, check_s=0.1)
    assert (dev.info.source, dev.info.note) == ("amdsmi_counter", "")
    assert dev.read().power_w == 250.0


def test_mi250_die_pair_is_one_device_read_from_the_die_that_reports(
    fake_amdsmi: Install,
) -> None:
    clk = Clock()
    kw: dict[str, object] = {"market_name": "AMD Instinct MI250X", "oam_id": 0}
    silent = _gpu("gcd0", clk, silent=True, serial="0x10", **kw)
    reporting = _gpu("gcd1", clk, power_w=500.0, serial="0x11", **kw)
    other = _gpu("gcd2", clk, power_w=90.0, serial="0x12", market_name="AMD Instinct MI250X")
    other.oam_id = 1
    fake_amdsmi([silent, reporting, other])
    devs = amd.discover(env={}, check_s=0, clock=clk)
    assert [d.info.name for d in devs] == ["amdsmi:gcd1", "amdsmi:gcd2"]
    assert "GCDs 0+1" in devs[0].info.model and "counted once" in devs[0].info.model
    for d in devs:
        d.read()
    clk.t += 2.0
    assert devs[0].read().energy_j == pytest.approx(1000.0, abs=1e-4)  # not 0, not 2000
    assert devs[0].read().power_w == 500.0
    # one die of the pair visible to HIP: the pair is still measured (it cannot be split)
    fake_amdsmi([silent, reporting, other])
    (dev,) = amd.discover(env={"HIP_VISIBLE_DEVICES": "0"}, check_s=0, clock=clk)
    assert dev.info.name == "amdsmi:gcd1"


def test_mi250_pair_where_neither_die_reports_is_an_error_not_zero(fake_amdsmi: Install) -> None:
    kw: dict[str, object] = {"market_name": "AMD Instinct MI250", "product_serial": "PS1"}
    fake_amdsmi([_gpu("x", silent=True, **kw), _gpu("y", silent=True, **kw)])
    with pytest.raises(PowerBackendError, match="GCDs 0, 1: neither die reports power"):
        amd.discover(env={}, check_s=0)


def test_vm_guest_reads_no_counter(fake_amdsmi: Install) -> None:
    fake_amdsmi([_gpu(mode=fk.AmdSmiVirtualizationMode.GUEST, power_w=120.0)])
    (dev,) = amd.discover(env={}, check_s=0)
    assert dev.info.source == "amdsmi_power_average"
    assert "VM guest" in dev.info.note
    fake_amdsmi([_gpu(mode=fk.AmdSmiVirtualizationMode.GUEST, average=False)])
    with pytest.raises(PowerBackendError, match="VM guest"):
        amd.discover(env={}, check_s=0)


def test_implausible_counter_falls_back_to_power_with_a_label(fake_amdsmi: Install) -> None:
    # firmware counts in mJ while the library says 15.259 µJ: a "12.5 MW" GPU
    bad = FakeAmdGpu(uuid="bad", power_w=200.0, true_resolution_uj=15.259e-3)
    good = FakeAmdGpu(uuid="good", power_w=200.0)
    fake_amdsmi([bad, good])
    devs = amd.discover(env={}, check_s=0.1)
    assert [d.info.source for d in devs] == ["amdsmi_power_average", "amdsmi_counter"]
    assert devs[0].info.note.startswith("energy counter implausible")
    assert "200 kW from the counter vs 200 W measured" in devs[0].info.note
    assert devs[1].info.note == ""


def test_visible_devices_follow_the_rocm_runtime(fake_amdsmi: Install) -> None:
    gpus = [_gpu(f"u{i}", serial=f"0x{i + 0xA0:X}") for i in range(4)]
    fake_amdsmi(gpus)
    names = lambda env: [d.info.name for d in amd.discover(env=env, check_s=0)]  # noqa: E731
    assert names({"HIP_VISIBLE_DEVICES": "2,0"}) == ["amdsmi:u0", "amdsmi:u2"]  # system order
    # HIP indexes into what ROCR left visible
    assert names({"ROCR_VISIBLE_DEVICES": "1,3", "HIP_VISIBLE_DEVICES": "1"}) == ["amdsmi:u3"]
    assert names({"ROCR_VISIBLE_DEVICES": "GPU-a2"}) == ["amdsmi:u2"]
    assert names({"HIP_VISIBLE_DEVICES": "-1"}) == []
    assert names({"CUDA_VISIBLE_DEVICES": "3"}) == ["amdsmi:u3"]  # HIP honours it too


def test_hip_order_comes_from_enumeration_info(fake_amdsmi: Install) -> None:
    fake_amdsmi([_gpu("late", hip_id=1), _gpu("early", hip_id=0)])
    devs = amd.discover(env={"HIP_VISIBLE_DEVICES": "0"}, check_s=0)
    assert [d.info.name for d in devs] == ["amdsmi:early"]


def test_process_share_from_gfx_engine_time(fake_amdsmi: Install) -> None:
    g = _gpu(procs=[(10, 1000), (20, 1000)])
    fake_amdsmi([g])
    (dev,) = amd.discover(env={}, check_s=0)
    assert dev.process_share({10}, since_us=1) is None  # first snapshot: no interval yet
    g.procs = [(10, 4000), (20, 2000)]
    assert dev.process_share({10}, since_us=2) == pytest.approx(0.75)
    assert dev.process_share({20}, since_us=2) == pytest.approx(0.25)  # same interval
    g.procs = [(10, 4000), (20, 2000)]
    assert dev.process_share({10}, since_us=3) is None  # nothing ran


@pytest.mark.parametrize("version", fk.VERSIONS)
def test_every_bindings_release_reads_the_counter(
    fake_amdsmi: Install, version: tuple[int, int]
) -> None:
    # before 6.3 the accumulator is the 'power' key; before 6.4 there is no virtualization
    # mode nor enumeration info
    clk = Clock()
    fake_amdsmi([_gpu(clock=clk, power_w=200.0)], version=version)
    (dev,) = amd.discover(env={}, check_s=0, clock=clk)
    assert dev.info.source == "amdsmi_counter"
    dev.read()
    clk.t += 10.0
    assert dev.read().energy_j == pytest.approx(2000.0, abs=2e-5)
    # an MI250 pair whose power fields are N/A: the reporting die is the one that counts
    kw: dict[str, object] = {"market_name": "AMD Instinct MI250", "oam_id": 0, "average": False}
    reporting = _gpu("g1", clk, **kw)
    reporting.set_ticks(10**9)  # counting since boot
    fake_amdsmi([_gpu("g0", clk, silent=True, **kw), reporting], version=version)
    (pair,) = amd.discover(env={}, check_s=0, clock=clk)
    assert pair.info.name == "amdsmi:g1" and pair.info.source == "amdsmi_counter"


def test_a_gpu_found_but_unusable_is_a_reason_not_no_device(
    fake_amdsmi: Install, tmp_path: Path
) -> None:
    fake_amdsmi([_gpu(counter=False, current=False, average=False)])
    (p,) = [
        p
        for p in detect.probe_all(powercap_root=tmp_path, nvml_period=False)
        if p.family == "amdsmi"
    ]
    assert not p.ok
    assert p.reason.startswith("AMD GPU 0 (AMD Instinct MI210): no energy counter")
    assert "amd-smi" in p.fix
    # one usable GPU beside it: that one is the device, the other is logged
    fake_amdsmi([_gpu("bad", counter=False, current=False, average=False), _gpu("good")])
    assert [d.info.name for d in amd.discover(env={}, check_s=0)] == ["amdsmi:good"]


def test_errors_are_translated_and_a_lost_gpu_degrades(fake_amdsmi: Install) -> None:
    fake_amdsmi([], init_error=fk.AMDSMI_STATUS_DRIVER_NOT_LOADED)
    with pytest.raises(PowerBackendError, match="amdgpu driver is not loaded"):
        amd.discover(env={})
    g = _gpu()
    fake_amdsmi([g])
    (dev,) = amd.discover(env={}, check_s=0)
    g.lost = True
    with pytest.raises(PowerBackendError, match="no such device"):
        dev.read()


def test_probe_reports_amd_with_reason(fake_amdsmi: Install, tmp_path: Path) -> None:
    fake_amdsmi([], init_error=fk.AMDSMI_STATUS_NO_PERM)
    (p,) = [p for p in detect.probe_all(powercap_root=tmp_path) if p.family == "amdsmi"]
    assert not p.ok and "permission" in p.reason and "render" in p.fix


# --- the fake against the real bindings (PyPI `amdsmi`, in the dev extra) --------------


def _real() -> dict[str, ast.Module]:
    spec = importlib.util.find_spec("amdsmi")  # finds the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("the amdsmi bindings are not installed")
    root = Path(spec.origin).parent
    names = ("__init__", "amdsmi_interface", "amdsmi_exception", "amdsmi_wrapper")
    return {n: ast.parse((root / f"{n}.py").read_text()) for n in names}


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _int_constants(tree: ast.Module) -> dict[str, int]:
    out = {}
    for n in tree.body:
        if (
            isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
            and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, int)
        ):
            out[n.targets[0].id] = n.value.value
    return out


def test_the_fake_has_the_real_bindings_names_keys_and_values() -> None:
    real = _real()
    exported = {
        a.asname or a.name
        for n in ast.walk(real["__init__"])
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    fake = fk.make_module([])
    mine = [n for n in dir(fake) if n.startswith(("amdsmi_", "AmdSmi"))]
    assert len(mine) >= 14
    for name in mine:
        assert name in exported, f"the real amdsmi exports no {name}"
    # signatures: the same positional parameters
    funcs = _functions(real["amdsmi_interface"])
    for name in (n for n in mine if n.startswith("amdsmi_")):
        real_args = [a.arg for a in funcs[name].args.args]
        code = getattr(fake, name).__code__
        assert code.co_argcount == len(real_args), name
    # dict keys the fake returns are keys the real function builds
    handle = FakeAmdGpu(uuid="u", hip_id=0)
    m = fk.make_module([handle])
    m.amdsmi_init()
    for name in (
        "amdsmi_get_power_info",
        "amdsmi_get_energy_count",
        "amdsmi_get_gpu_asic_info",
        "amdsmi_get_gpu_board_info",
        "amdsmi_get_gpu_enumeration_info",
        "amdsmi_get_gpu_virtualization_mode",
    ):
        strings = {
            c.value
            for c in ast.walk(funcs[name])
            if isinstance(c, ast.Constant) and isinstance(c.value, str)
        }
        for key in getattr(m, name)(handle):
            assert key in strings, f"{name} has no key {key!r}"
    handle.procs = [(1, 2)]
    (proc,) = m.amdsmi_get_gpu_process_list(handle)
    strings = {
        c.value
        for c in ast.walk(funcs["amdsmi_get_gpu_process_list"])
        if isinstance(c, ast.Constant) and isinstance(c.value, str)
    }
    for key in [*proc, *proc["engine_usage"], *proc["memory_usage"]]:
        assert key in strings, key
    # "N/A" power fields, and 0xFFFF as the library's not-available marker
    # (only 0xFFFF: the library's UINT32_MAX for an unsupported field passes through)
    assert "N/A" in ast.unparse(funcs["amdsmi_get_power_info"])
    assert f"== {fk.UINT16_NA}" in ast.unparse(funcs["amdsmi_get_power_info"])
    assert str(fk.UINT32_NA) not in ast.unparse(funcs["amdsmi_get_power_info"])
    # status codes and enum values
    consts = _int_constants(real["amdsmi_wrapper"])
    for name in (n for n in dir(fk) if n.startswith("AMDSMI_STATUS_")):
        assert consts[name] == getattr(fk, name), name
    for enum_cls, prefix in (
        (fk.AmdSmiInitFlags, "AMDSMI_"),
        (fk.AmdSmiVirtualizationMode, "AMDSMI_VIRTUALIZATION_MODE_"),
    ):
        for member in enum_cls:
            assert consts[prefix + member.name] == member.value, member
    # the exception tree
    classes = {n.name: n for n in real["amdsmi_exception"].body if isinstance(n, ast.ClassDef)}
    lib = classes["AmdSmiLibraryException"]
    assert [ast.unparse(b) for b in lib.bases] == ["AmdSmiException"]
    assert "self.err_code = err_code" in ast.unparse(lib)


def test_the_real_bindings_without_rocm_are_absent_with_the_reason() -> None:
    _real()
    with pytest.raises(PowerBackendError, match=r"libamd_smi\.so"):
        amd.discover(env={})
