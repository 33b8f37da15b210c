from __future__ import annotations

import math

import pytest

from h3optim import MODES, EtaController


def thermo(c: EtaController) -> None:
    while c.control_step()[2] != "thermodynamic":
        c.observe(eta=1.0, accuracy=0.5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes_start_where_documented(mode: str) -> None:
    c = EtaController(mode, total_epochs=20)
    assert c.control_step() == (1.0, 1.0, "warmup")  # warmup is uniform over all data
    c.epoch = 5
    k, u, phase = c.control_step()
    assert (k, u, phase) == (*MODES[mode], "thermodynamic")
    with pytest.raises(ValueError):
        EtaController("turbo")


def test_none_or_stale_eta_changes_nothing() -> None:
    c = EtaController("balanced", total_epochs=40, eta_source=lambda: None)
    thermo(c)
    before = (c.keep_frac, c.uniform_mix)
    for _ in range(10):
        c.control_step()
        c.observe()
    assert (c.keep_frac, c.uniform_mix) == before
    assert all(d["change"] == "none" for d in c.decisions)


def test_a_probe_that_pays_is_adopted_and_one_that_loses_is_not() -> None:
    c = EtaController("balanced", total_epochs=60, threshold=0.05)
    thermo(c)
    start = c.keep_frac

    def run_epoch(eta_a: float, eta_b: float) -> None:
        k, _u, _ = c.control_step()
        c.observe(eta=eta_b if k < c.keep_frac else eta_a)

    for _ in range(3):  # A B A: the more aggressive probe B is 50 % more efficient
        run_epoch(1.0, 1.5)
    assert c.keep_frac == pytest.approx(start - 0.1)
    k_after = c.keep_frac
    for _ in range(2):  # now the probe loses
        run_epoch(1.0, 0.5)
    assert c.keep_frac > k_after - 0.1 + 1e-9
    assert "probe" in c.get_report()


def test_natural_decay_alone_moves_nothing() -> None:
    # η halves every epoch whatever the setting: A,B,A comparisons see B between its
    # neighbours, within the threshold only if decay is smooth; use geometric decay
    c = EtaController("balanced", total_epochs=60, threshold=0.3)
    thermo(c)
    start = c.keep_frac
    eta = 1.0
    for _ in range(9):
        c.control_step()
        c.observe(eta=eta)
        eta *= 0.9
    assert c.keep_frac == start


def test_accuracy_guard_backs_off_toward_safe() -> None:
    c = EtaController("extreme", accuracy_tolerance=1.0, total_epochs=30)
    thermo(c)
    c.control_step()
    c.observe(eta=1.0, accuracy=0.95)
    c.control_step()
    c.observe(eta=1.0, accuracy=0.92)  # 3 points below the best
    assert c.keep_frac >= MODES["safe"][0] and c.uniform_mix >= MODES["safe"][1]
    assert "back off toward safe" in c.get_report()


def test_starvation_guard_raises_uniform_mix() -> None:
    c = EtaController("green", total_epochs=60)
    thermo(c)
    u0 = c.uniform_mix
    for loss in (1.0, 0.99, 0.98, 0.9, 1.2, 1.5):
        c.control_step()
        c.observe(loss=loss)
    assert c.uniform_mix == pytest.approx(u0 + 0.1)
    assert "starved" in c.get_report()


def test_state_dict_round_trip() -> None:
    c = EtaController("green", total_epochs=30)
    thermo(c)
    c.control_step()
    c.observe(eta=2.0, accuracy=0.9)
    d = EtaController("safe", total_epochs=30)
    d.load_state_dict(c.state_dict())
    assert (d.keep_frac, d.uniform_mix, d.epoch, d.best_accuracy) == (
        c.keep_frac,
        c.uniform_mix,
        c.epoch,
        c.best_accuracy,
    )
    assert d.control_step() == c.control_step()


def test_a_state_dict_is_a_copy_on_save_and_on_load() -> None:
    """As a torch optimizer's: a state taken does not change as training goes on, and
    controllers loaded from one state do not share its lists (before: they did)."""
    import copy

    c = EtaController("balanced", total_epochs=10, eta_source=lambda: 0.5)
    for e in range(6):
        c.control_step(0.3, 1.0)
        c.observe(accuracy=0.5 + e * 0.05, loss=1.0, energy=10.0)
    state = c.state_dict()
    saved = copy.deepcopy(state)
    assert state["history"] and state["history"] == c.history
    c.control_step(0.3, 1.0)
    c.observe(accuracy=0.2, loss=3.0, energy=10.0)  # an accuracy drop: a decision too
    assert len(c.history) == 7 and c.decisions
    assert state == saved  # the state taken is as it was
    a, b = EtaController("balanced", total_epochs=10), EtaController("balanced", total_epochs=10)
    a.load_state_dict(state)
    b.load_state_dict(state)
    for d in (a, b):
        for k, v in state.items():
            assert getattr(d, k) == v
            if isinstance(v, (list, dict)):
                assert getattr(d, k) is not v
    a.control_step(0.3, 1.0)
    a.observe(accuracy=0.2, loss=3.0, energy=10.0)
    a.history[0]["loss"] = -1.0  # an entry changed in place too
    assert len(a.history) == 7 and len(b.history) == 6 and state == saved
    assert b.history[0]["loss"] == 1.0 and b.decisions == saved["decisions"]


def test_held_out_loss_and_energy_take_precedence_over_the_source() -> None:
    c = EtaController("balanced", total_epochs=40, eta_source=lambda: 123.0)
    c.control_step()
    c.observe(loss=2.0, energy=10.0)  # no previous loss yet: the source speaks
    assert c.history[-1]["eta"] == 123.0
    c.control_step()
    c.observe(loss=1.0, energy=10.0)  # ΔI = 1 nat = 1/ln 2 bits over 10 J
    assert c.history[-1]["eta"] == pytest.approx(1 / math.log(2) / 10.0)


def windowed_stream(c: EtaController, gain_b: float, seed: int, windows: int = 40) -> None:
    """Feed ``windows`` windows of a decaying, noisy η; B windows are ``gain_b`` better."""
    import random

    rng = random.Random(seed)
    thermo(c)
    c.control_step()
    for t in range(windows):
        label, _k, _u = c.window_setting()
        eta = 2.0 * 0.97**t * (1 + (gain_b if label == "B" else 0.0)) * (1 + rng.gauss(0, 0.05))
        c.observe_window(eta)


def test_windowed_ab_adopts_a_known_better_setting() -> None:
    c = EtaController("balanced", total_epochs=20)
    start = c.keep_frac
    windowed_stream(c, gain_b=0.3, seed=0, windows=8)  # B 30 % better
    assert c.keep_frac == pytest.approx(start - 0.1)
    assert "windowed A/B" in c.get_report() and "beat" in c.get_report()


@pytest.mark.parametrize("seed", range(10))
def test_windowed_ab_changes_nothing_when_neither_is_better(seed: int) -> None:
    c = EtaController("balanced", total_epochs=20)
    start = (c.keep_frac, c.uniform_mix)
    windowed_stream(c, gain_b=0.0, seed=seed)
    assert (c.keep_frac, c.uniform_mix) == start
    assert c.window_state == "held" and not c.window_testing
    assert "cannot beat the fixed schedule" in c.get_report()
    assert c.control_step()[:2] == start  # the epoch A/B/A alternation is off too


def test_windowed_ab_backs_off_fast_from_a_worse_probe() -> None:
    c = EtaController("balanced", total_epochs=20)
    start = c.keep_frac
    windowed_stream(c, gain_b=-0.4, seed=1, windows=40)
    assert c.keep_frac == start and c.window_state == "held"
    # decided after min_pairs comparisons (7 windows), not at max_pairs
    assert len([d for d in c.decisions if d["change"] != "none"]) == 1
    held = next(d for d in c.decisions if d["change"] == "hold fixed schedule")
    assert "lost to" in held["reason"]


def test_windowed_none_eta_repeats_the_window() -> None:
    c = EtaController("balanced", total_epochs=20)
    thermo(c)
    c.control_step()
    assert c.window_setting()[0] == "A"
    c.observe_window(1.0)
    assert c.window_setting()[0] == "B"
    c.observe_window(None)
    c.observe_window(float("nan"))
    assert c.window_setting()[0] == "B"


def test_windowed_accuracy_guard_undoes_an_adoption_once_and_ignores_noise() -> None:
    c = EtaController("balanced", total_epochs=20, accuracy_tolerance=1.0)
    c.windowed = True
    thermo(c)
    start = (c.keep_frac, c.uniform_mix)
    c.control_step()
    c.observe(accuracy=0.90)
    c.control_step()
    c.observe(accuracy=0.85)  # 5 points down, nothing adopted: the fixed schedule stays
    assert (c.keep_frac, c.uniform_mix) == start and "back off" not in c.get_report()
    windowed_stream(c, gain_b=0.3, seed=0, windows=7)
    assert c.keep_frac < start[0]
    for _ in range(3):
        c.control_step()
        c.observe(accuracy=0.80)
    assert (c.keep_frac, c.uniform_mix) == start and c.window_state == "held"
    assert c.get_report().count("back off") == 1


def test_learning_floor_keeps_what_is_not_learned_yet() -> None:
    c = EtaController("balanced", total_epochs=20)  # keep 0.6, uniform 0.3
    assert c.control_step(unlearned=0.9) == (1.0, 1.0, "warmup")  # the floor: thermodynamic only
    c.epoch = 5
    k, u, phase = c.control_step(unlearned=0.56)
    assert phase == "thermodynamic" and u == 0.3 and k == pytest.approx(0.56 / 0.7)
    assert not c.window_testing  # A/B windows pause while the floor binds
    assert c.keep_frac == 0.6  # the controller's own setting is unchanged
    assert "learning floor" in c.get_report() and "56%" in c.get_report()
    assert c.control_step(unlearned=0.95)[0] == 1.0  # capped at all the data
    n = len(c.decisions)
    assert c.control_step(unlearned=0.2)[:2] == (0.6, 0.3)  # most learned: no floor
    assert c.window_testing and len(c.decisions) == n
    assert c.control_step(unlearned=math.nan)[:2] == (0.6, 0.3)  # no evidence, no change
    for epoch, share in ((7, 0.6), (8, 0.5)):  # consecutive floors: one line in the report
        c.epoch = epoch
        c.control_step(unlearned=share)
    report = c.get_report()
    assert "epochs 7–8: learning floor" in report and "from 60% to 50%" in report
    assert "those epochs kept 0.86 to 0.71 instead of 0.60" in report
    assert report.count("learning floor") == 3  # twice at epoch 5 (not consecutive), 7–8 once
    for epoch in (10, 11):  # every sample kept both epochs: the keep said once
        c.epoch = epoch
        c.control_step(unlearned=0.9)
    assert "those epochs kept 1.00 instead of 0.60" in c.get_report()


def test_a_test_the_phase_has_no_room_for_does_not_start() -> None:
    c = EtaController("balanced", total_epochs=20)  # max_pairs 8: a test needs 17 windows
    thermo(c)
    c.control_step()
    start = (c.keep_frac, c.uniform_mix)
    c.plan_windows(17)
    assert c.window_testing  # room enough: the test runs
    c.plan_windows(16)
    assert c.window_state == "held" and not c.window_testing
    assert (c.keep_frac, c.uniform_mix) == start
    held = next(d for d in c.decisions if d["change"] == "hold fixed schedule")
    assert "too short" in held["reason"] and held["windows"] == 16
    assert "too short" in c.get_report()


def test_planning_changes_nothing_once_a_test_has_begun() -> None:
    c = EtaController("balanced", total_epochs=20)
    thermo(c)
    c.control_step()
    c.observe_window(1.0)  # the first window is in
    c.plan_windows(3)
    assert c.window_testing


@pytest.mark.parametrize(
    ("shares", "words"),
    [
        ((0.70, 0.72, 0.75, 0.80), "rose from 70% to 80%"),
        ((0.80, 0.75, 0.70), "fell from 80% to 70%"),
        ((0.70, 0.80, 0.70), "stayed at 70%"),
    ],
)
def test_the_report_says_which_way_the_unlearned_share_went(
    shares: tuple[float, ...], words: str
) -> None:
    c = EtaController("balanced", total_epochs=20)
    c.epoch = 5
    for share in shares:  # consecutive binding floors: one line in the report
        c.control_step(unlearned=share)
        c.observe(accuracy=0.5)
    report = c.get_report()
    assert report.count("learning floor") == 1 and words in report
    assert not any(w in report for w in {"rose", "fell", "stayed"} - {words.split()[0]})


def test_the_epoch_ab_test_pauses_while_the_learning_floor_binds() -> None:
    """Epochs the learning floor raised all train at the floor, not at A or B: no
    decision comes from them, and no A/B/A triple spans one (before: noise between
    identical floored epochs moved keep_frac from 0.6 to 0.4)."""
    c = EtaController("balanced", total_epochs=30, warmup=0.1, consolidation=0.1)
    while c.schedule.phase(c.epoch) != "thermodynamic":
        c.control_step()
        c.observe(eta=1.0)

    def epoch(eta: float, unlearned: float | None = None) -> float:
        k, _u, phase = c.control_step(unlearned=unlearned)
        assert phase == "thermodynamic"
        c.observe(eta=eta)
        return k

    for eta in (1.0, 1.0, 0.9, 0.85, 0.95, 0.7, 0.8, 0.6, 0.7):  # 90 % not learned yet
        assert epoch(eta, unlearned=0.9) == 1.0
    assert c.keep_frac == 0.6
    assert not [d for d in c.decisions if d["change"].startswith("keep_frac")]
    # an A epoch, then the floor binds again: the next free epoch starts a new triple (A)
    assert epoch(1.0) == 0.6
    assert epoch(9.0, unlearned=0.9) == 1.0
    assert [epoch(1.0), epoch(2.0), epoch(1.0)] == pytest.approx([0.6, 0.5, 0.6])
    assert c.keep_frac == pytest.approx(0.5)  # B beat both A neighbours: adopted
    adopted = [d for d in c.decisions if d["change"] == "keep_frac down"]
    assert len(adopted) == 1 and "probe η 2 beat 1 " in adopted[0]["reason"]


def _epochs_at(c: EtaController, eta_of: dict[float, float], epochs: int) -> list[float]:
    """Train ``epochs`` epochs whose η depends on keep_frac alone; their keep_fracs."""
    kept = []
    for _ in range(epochs):
        k, _u, _phase = c.control_step()
        kept.append(round(k, 2))
        c.observe(eta=eta_of[round(k, 2)], accuracy=0.9)
    return kept


def test_after_an_adoption_the_next_triple_compares_a_epochs_at_the_new_setting() -> None:
    """0.5 beats 0.6 by 20 % (adopted); 0.4 beats 0.5 by 1.7 %, under the 5 % threshold.
    Before, the epoch after an adoption was already the next B, and its left-hand A was the
    last epoch at 0.6: 0.4 was compared with the mean of 0.6's and 0.5's η and adopted."""
    c = EtaController("balanced", total_epochs=20, threshold=0.05)
    eta_of = {1.0: 1.0, 0.6: 1.0, 0.5: 1.2, 0.4: 1.22, 0.3: 1.23, 0.2: 1.235}
    assert _epochs_at(c, eta_of, 3) == [1.0, 1.0, 1.0]  # warmup
    assert _epochs_at(c, eta_of, 3) == [0.6, 0.5, 0.6]  # A, B, A: 0.5 adopted
    assert c.keep_frac == pytest.approx(0.5)
    assert _epochs_at(c, eta_of, 3) == [0.5, 0.4, 0.5]  # a fresh A at the new setting first
    _epochs_at(c, eta_of, 8)
    adopted = [d for d in c.decisions if d["change"] == "keep_frac down"]
    assert c.keep_frac == pytest.approx(0.5) and len(adopted) == 1


def test_after_a_back_off_from_the_probe_the_next_a_is_at_the_eased_setting() -> None:
    c = EtaController("balanced", total_epochs=20, threshold=0.05)
    eta_of = {1.0: 1.0, 0.65: 2.0, 0.6: 1.0, 0.55: 1.0, 0.5: 0.5}
    _epochs_at(c, eta_of, 3)  # warmup
    assert _epochs_at(c, eta_of, 3) == [0.6, 0.5, 0.6]  # B loses: keep_frac eased up
    assert c.keep_frac == pytest.approx(0.65)
    # the next A trains at 0.65 (before: the next epoch was B, 0.55, beside a 0.6 A)
    assert _epochs_at(c, eta_of, 2) == [0.65, 0.55]


def test_the_accuracy_unit_is_decided_for_the_run_not_for_each_value() -> None:
    """A 100-class task in percent starts at chance, 1.0 %. Read as a fraction it became a
    best of 100 points, and every later epoch backed off toward safe."""
    c = EtaController("green", total_epochs=10)
    for acc in (1.0, 20.0, 30.0, 38.0, 44.0, 48.0, 51.0, 53.0, 54.0, 55.0):
        c.control_step()
        c.observe(eta=1.0, accuracy=acc)
    assert not [d for d in c.decisions if d["change"] == "back off toward safe"]
    assert c.best_accuracy == 55.0 and c.accuracy_unit == "percent"
    # a percent run that stays at or below 1 % is told as much
    p = EtaController("green", total_epochs=10, accuracy_unit="percent")
    thermo(p)
    for acc in (1.0, 0.8):  # 0.2 points lower: within the tolerance of 1 point
        p.control_step()
        p.observe(eta=1.0, accuracy=acc)
    assert p.best_accuracy == 1.0 and p.keep_frac == MODES["green"][0]
    # fractions, as AutoH3 gives them, still back off
    f = EtaController("green", total_epochs=10, accuracy_unit="fraction")
    thermo(f)
    for acc in (0.95, 0.92):
        f.control_step()
        f.observe(eta=1.0, accuracy=acc)
    assert f.best_accuracy == pytest.approx(95.0) and "back off toward safe" in f.get_report()
    with pytest.raises(ValueError, match="accuracy_unit='percent'"):
        f.observe(accuracy=37.0)
    with pytest.raises(ValueError, match="accuracy_unit"):
        EtaController(accuracy_unit="points")
