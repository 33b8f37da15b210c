"""NVML backend edge cases through a fake ``pynvml`` (same names, units, error classes)."""

from __future__ import annotations

from typing import Any

import pytest

from h3d.power import detect, nvml
from h3d.power.base import PART_TIME_CAVEAT, PowerBackendError, caveat
from tests.h3d import fake_pynvml as fk
from tests.h3d.fake_pynvml import FakeGpu, make_module


def uuids(env: dict[str, str]) -> list[str | None]:
    return [d.info.uuid for d in nvml.discover(env=env, probe_period=False)]


def test_a_mig_uuid_selects_its_parent_gpu(fake_nvml) -> None:
    gpus = [
        FakeGpu("GPU-aaaa-0000", max_migs=7, migs=["MIG-1111-a", "MIG-1111-b"]),
        FakeGpu("GPU-bbbb-0000", max_migs=7, migs=["MIG-2222-a"]),
        FakeGpu("GPU-cccc-0000"),  # no MIG support at all
    ]
    fake_nvml(gpus)
    assert uuids({"CUDA_VISIBLE_DEVICES": "MIG-2222-a"}) == ["GPU-bbbb-0000"]
    assert uuids({"CUDA_VISIBLE_DEVICES": "MIG-1111-b,GPU-cccc"}) == [
        "GPU-aaaa-0000",
        "GPU-cccc-0000",
    ]
    assert uuids({"CUDA_VISIBLE_DEVICES": "MIG-9999"}) == []


def test_cuda_visible_devices_stops_at_the_first_invalid_entry(fake_nvml) -> None:
    fake_nvml([FakeGpu("GPU-0"), FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    assert uuids({"CUDA_VISIBLE_DEVICES": "2,0"}) == ["GPU-0", "GPU-2"]
    assert uuids({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert uuids({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["GPU-1"]
    assert uuids({"CUDA_VISIBLE_DEVICES": "0, 1"}) == ["GPU-0", "GPU-1"]
    # an entry that names no GPU is invalid too (as torch.cuda reads it: an index past the
    # device count ends the list): GPU 0 here is hidden from CUDA, so it is not measured
    assert uuids({"CUDA_VISIBLE_DEVICES": "1,5,0"}) == ["GPU-1"]
    assert uuids({"CUDA_VISIBLE_DEVICES": "GPU-1,GPU-9,GPU-2"}) == ["GPU-1"]
    assert uuids({"CUDA_VISIBLE_DEVICES": "7,0"}) == []


@pytest.mark.parametrize(
    "value_type",
    [
        fk.NVML_VALUE_TYPE_DOUBLE,
        fk.NVML_VALUE_TYPE_UNSIGNED_INT,
        fk.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
        fk.NVML_VALUE_TYPE_SIGNED_INT,
        fk.NVML_VALUE_TYPE_UNSIGNED_SHORT,  # power in mW fits no ushort; a newer type
    ],
)
def test_instant_power_is_read_through_the_member_its_value_type_names(
    fake_nvml, value_type: int
) -> None:
    fake_nvml([FakeGpu("GPU-x", counter=False, power_mw=212_500, value_type=value_type)])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.info.source == "nvml_power_instant"
    assert dev.read().power_w == pytest.approx(212.5)


def test_an_instant_power_field_that_stops_answering_costs_the_power_not_the_counter(
    fake_nvml,
) -> None:
    mod = fake_nvml([FakeGpu("GPU-a", counter=True, power_mw=150_000)])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.has_instant and dev.has_counter
    dev.read()

    def refuse(handle: Any, ids: list[int]) -> list[Any]:
        raise mod.NVMLError_NotSupported()

    mod.nvmlDeviceGetFieldValues = refuse
    got = dev.read()  # not a PowerBackendError: the counter still answers
    assert got.power_w is None and got.energy_j is not None and got.energy_j >= 0


def test_both_update_periods_are_measured_in_one_bounded_loop(fake_nvml) -> None:
    a, b = FakeGpu("GPU-a"), FakeGpu("GPU-b", counter=False)
    mod = fake_nvml([a, b])
    ticks = {"n": 0}
    real_count = mod.nvmlDeviceGetTotalEnergyConsumption

    def counter(h: FakeGpu) -> int:
        ticks["n"] += 1
        if ticks["n"] % 3 == 0:
            h.energy_mj += 7  # changes on every third read
        return real_count(h)

    mod.nvmlDeviceGetTotalEnergyConsumption = counter
    da, db = nvml.discover(env={}, probe_period=True)
    assert da.info.granularity_s is not None and da.info.granularity_s > 0
    assert db.info.granularity_s is None  # a constant power field never changes: unknown


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (fk.NVMLError_LibraryNotFound, "libnvidia-ml.so"),
        (fk.NVMLError_DriverNotLoaded, "driver is not loaded"),
        (fk.NVMLError_NoPermission, "no permission"),
    ],
)
def test_init_errors_are_reasons_with_a_fix(fake_nvml, error: type, reason: str) -> None:
    fake_nvml([FakeGpu("GPU-a")], init_error=error)
    with pytest.raises(PowerBackendError, match=reason):
        nvml.discover(env={})
    (probe,) = [p for p in detect.probe_all(nvml_period=False) if p.family == "nvml"]
    assert not probe.ok and reason in probe.reason
    assert any(w in probe.fix for w in ("driver", "/dev/nvidia"))


def test_a_gpu_without_energy_or_power_is_skipped_and_the_others_kept(fake_nvml, caplog) -> None:
    mod = fake_nvml([FakeGpu("GPU-dead", counter=False, instant=False), FakeGpu("GPU-ok")])

    def usage(h: FakeGpu) -> int:
        if h.uuid == "GPU-dead":
            raise fk.NVMLError_NotSupported()
        return h.power_mw

    mod.nvmlDeviceGetPowerUsage = usage
    assert uuids({}) == ["GPU-ok"]
    assert "neither energy nor power" in caplog.text


def test_a_gpu_lost_at_discovery_is_skipped(fake_nvml, caplog) -> None:
    fake_nvml([FakeGpu("GPU-lost", lost=True), FakeGpu("GPU-ok")])
    assert uuids({}) == ["GPU-ok"]
    assert "fell off the bus" in caplog.text


def test_uninitialised_nvml_is_reported_not_raised_raw(fake_nvml) -> None:
    g = FakeGpu("GPU-a")
    mod = fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    mod.nvmlShutdown()  # someone else shut NVML down under us
    with pytest.raises(PowerBackendError, match="not initialised"):
        dev.read()


def test_counter_stays_monotonic_over_several_resets(fake_nvml) -> None:
    g = FakeGpu("GPU-a", energy_mj=5_000_000)
    fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    seen = [dev.read().energy_j]
    for raw_mj in (5_100_000, 100, 900, 0, 2_000):
        g.energy_mj = raw_mj
        seen.append(dev.read().energy_j)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] == pytest.approx(100.0 + 0.1 + 0.8 + 0.0 + 2.0)


def test_process_share_is_none_where_nvml_has_no_samples(fake_nvml) -> None:
    g = FakeGpu("GPU-a", procs=[(1, 30), (2, 10)])
    mod = fake_nvml([g])
    (dev,) = nvml.discover(env={}, probe_period=False)
    assert dev.process_share({1}) == pytest.approx(0.75)
    assert dev.process_share({1, 2, 3}) == pytest.approx(1.0)

    def not_found(h: FakeGpu, ts: int) -> list[object]:
        raise fk.NVMLError_NotFound()  # what NVML says when no process ran in the window

    mod.nvmlDeviceGetProcessUtilization = not_found
    assert dev.process_share({1}) is None


def test_the_fake_has_the_real_libraries_names_and_values() -> None:
    """Every NVML name the fake defines exists in nvidia-ml-py with the same value."""
    real = pytest.importorskip("pynvml")  # nvidia-ml-py, in the dev and nvidia extras
    fake = make_module([])
    names = [n for n in dir(fake) if n.startswith(("NVML", "nvml"))]
    assert len(names) > 25
    for name in names:
        assert hasattr(real, name), f"the real pynvml has no {name}"
        mine, theirs = getattr(fake, name), getattr(real, name)
        if isinstance(mine, int):
            assert mine == theirs, name
        elif isinstance(mine, type):
            assert issubclass(theirs, real.NVMLError), name
            if name != "NVMLError":
                assert theirs().value == mine.value, name


def test_the_real_library_without_a_driver_is_absent_with_the_reason() -> None:
    real = pytest.importorskip("pynvml")
    try:
        real.nvmlInit()
    except real.NVMLError_LibraryNotFound:
        pass
    else:  # a machine with an NVIDIA driver: this test is about machines without one
        real.nvmlShutdown()
        pytest.skip("an NVIDIA driver is installed here")
    with pytest.raises(PowerBackendError, match="libnvidia-ml.so"):
        nvml.discover(env={})
    (probe,) = [p for p in detect.probe_all(nvml_period=False) if p.family == "nvml"]
    assert not probe.ok and "libnvidia-ml.so" in probe.reason and "NVIDIA driver" in probe.fix


def test_polled_power_on_a100_h100_carries_the_part_time_caveat(fake_nvml) -> None:
    fake_nvml(
        [
            FakeGpu("GPU-a", name="NVIDIA A100-SXM4-40GB", counter=False),
            FakeGpu("GPU-h", name="NVIDIA H100 80GB HBM3", counter=True),
            FakeGpu("GPU-t", name="Tesla T4", counter=False),
        ]
    )
    a, h, t = nvml.discover(env={}, probe_period=False)
    assert a.info.source == "nvml_power_instant" and "Part-time Power" in a.info.note
    assert h.info.source == "nvml_counter" and h.info.note == ""  # the counter is preferred
    assert t.info.note == ""
    assert caveat("nvml_power_average", "NVIDIA H100 PCIe") == PART_TIME_CAVEAT
    assert caveat("nvml_counter", "NVIDIA H100 PCIe") is None
