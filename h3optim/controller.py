"""``EtaController``: retunes ``keep_frac``/``uniform_mix`` from measured efficiency.

Shaped like ``torch.optim.lr_scheduler.ReduceLROnPlateau``: it holds what it tunes, reads a
signal once per epoch, and changes things only with evidence.

Each epoch: :meth:`control_step` returns the (keep_frac, uniform_mix, phase) to train with;
after the epoch, :meth:`observe` takes its figures. The signal is the **marginal** η (bits of
held-out information per joule over the epoch): from ``eta_source`` (by default the
profiler's ``live_eta``, the daemon's marginal η), else computed from the ``loss`` and
``energy`` passed to ``observe``. ``None`` or a stale value means "change nothing".

η falls as training converges whatever the settings, so consecutive epochs cannot tell a
knob's effect from that decay. In the thermodynamic phase the controller therefore
alternates two settings, the current one (A) and a probe one step more aggressive (B),
epoch by epoch, and compares each B epoch with the mean of the A epochs on either side:
B is adopted if it beats them by ``threshold``, abandoned (and the current setting eased) if
it loses by as much. While the learning floor binds (see :meth:`EtaController.control_step`)
the comparison pauses: such an epoch trains at the floor, neither at A nor at B, and the next
epoch the floor leaves free begins a new A, B, A. Guards: accuracy more than
``accuracy_tolerance`` points below the best seen backs off toward ``safe``; rising loss
volatility (starvation) raises ``uniform_mix``.

**Windowed A/B** (what :class:`~h3optim.AutoH3` uses). In an 8–20-epoch run one η per epoch
is too little evidence, too late. With :meth:`observe_window` the comparison runs over windows
of steps inside the thermodynamic phase: windows alternate A (the current setting, which
starts at the mode's already-safe setting) and B (``keep_frac`` one ``step`` lower), each
window reports its marginal η, and every B window is compared with the mean of the A windows
on either side (which cancels the smooth decay of η). After ``min_pairs`` comparisons the
relative differences decide, with a t-like test: B is adopted when it is better by more than
``threshold`` and by ``z`` standard errors; a B that is worse by ``z`` standard errors ends the
test at once (fast back-off); ``max_pairs`` comparisons without evidence end it too, and a
test that the phase ahead has no room for (:meth:`plan_windows`) does not start. In those
cases the controller holds the fixed schedule — the current setting through the
thermodynamic phase — and says so in :meth:`get_report`. Once windows are observed the
epoch-by-epoch A/B/A alternation is off, and the accuracy guard backs off only from an
adopted setting, straight to the setting it replaced (a held-out accuracy that wobbles by a
point between epochs does not push a fixed schedule toward ``safe``).
"""

from __future__ import annotations

import copy
import enum
import math
import warnings
from collections.abc import Callable
from typing import Any

from h3optim.sampler import PhaseSchedule

LN2 = math.log(2.0)


def _volatility(xs: list[float]) -> float:
    """Largest epoch-to-epoch loss change relative to the mean loss."""
    jumps = max(abs(b - a) for a, b in zip(xs, xs[1:], strict=False))
    return jumps / max(abs(sum(xs) / len(xs)), 1e-12)


def _number(x: Any) -> float | None:
    """``x`` as a builtin ``float`` (None kept): a numpy scalar (what ``np.mean`` or
    ``sklearn``'s metrics return) stored as it is would make the state dict fail
    ``torch.load``'s weights-only unpickler, in the process that tries to resume."""
    return None if x is None else float(x)


#: ``h3-optimizer`` 0.2.0's keyword names of :meth:`EtaController.observe`'s figures.
_LEGACY_FIGURES = {"train_loss": "loss", "energy_j": "energy", "info_bits": "info"}


def _legacy_figures(
    legacy: dict[str, float | None], **figures: float | None
) -> tuple[float | None, float | None, float | None]:
    """``observe``'s (loss, energy, info) with 0.2.0's keyword names taken for them."""
    for old, value in legacy.items():
        new = _LEGACY_FIGURES.get(old)
        if new is None:
            raise TypeError(f"EtaController.observe() got an unexpected keyword argument {old!r}")
        if figures[new] is not None:
            raise TypeError(f"EtaController.observe() got {new!r} twice (also as {old!r})")
        figures[new] = value
    return figures["loss"], figures["energy"], figures["info"]


def _moved(first: float, last: float) -> str:
    """How a share went from ``first`` to ``last``, in words, as the report rounds it."""
    a, b = f"{first:.0%}", f"{last:.0%}"
    if a == b:
        return f"stayed at {a}"
    return f"{'fell' if last < first else 'rose'} from {a} to {b}"


#: Starting (keep_frac, uniform_mix) of each mode.
MODES: dict[str, tuple[float, float]] = {
    "safe": (0.9, 0.5),
    "balanced": (0.6, 0.3),
    "green": (0.5, 0.2),
    "extreme": (0.3, 0.1),
}


class OperatingMode(enum.StrEnum):
    """The controller's modes as an enum, the name ``h3-optimizer`` 0.2.0 gave them.

    Each member is its mode's string (``OperatingMode.GREEN == "green"``), so either may be
    passed wherever a mode is taken; :data:`MODES` gives where each starts.
    """

    SAFE = "safe"
    BALANCED = "balanced"
    GREEN = "green"
    EXTREME = "extreme"


#: How :meth:`EtaController.observe` reads accuracies (see ``accuracy_unit``).
ACCURACY_UNITS = ("auto", "fraction", "percent")


class EtaController:
    """Steer the sampler's ``keep_frac`` and ``uniform_mix`` by measured efficiency.

    Args:
        mode: ``safe``, ``balanced``, ``green`` or ``extreme`` (see :data:`MODES`), or the
            :class:`OperatingMode` member of one.
        accuracy_tolerance: Accuracy points (percent) below the best seen that trigger a
            back-off.
        total_epochs: Length of training, for the phase schedule (10 by default; every epoch
            from it on is "consolidation": :meth:`control_step` warns once when it reaches
            one).
        eta_source: Callable returning the current marginal η (bits/J) or None.
        step: How much one move changes ``keep_frac``.
        threshold: Relative η difference that counts as evidence.
        min_keep_frac, max_keep_frac, min_uniform_mix: Bounds.
        warmup, consolidation: Phase fractions (see :class:`PhaseSchedule`).
        min_pairs: Windowed A/B: B-versus-A comparisons before any decision.
        max_pairs: Windowed A/B: comparisons after which, without evidence, the test ends and
            the fixed schedule is held.
        z: Windowed A/B: standard errors a difference must clear to count as evidence.
        accuracy_unit: How the accuracies given to :meth:`observe` are read, decided for the
            whole run, not value by value: ``"fraction"`` (in [0, 1]; a value above 1 is a
            ``ValueError``), ``"percent"``, or ``"auto"`` (the default): fractions until a
            value above 1 shows that the run reports percent; from then on it is
            ``"percent"``, and the values seen before are read again as percent (the best
            accuracy too). A percent run whose values all stay at or below 1 (chance level
            on 100 classes or more) cannot be told from fractions that way: pass
            ``"percent"``. Before, each value ≤ 1 was read as a fraction, so one
            chance-level 1.0 % became a best of 100 points and every later epoch backed off.
    """

    def __init__(
        self,
        mode: str = "balanced",
        accuracy_tolerance: float = 1.0,
        total_epochs: int = 10,
        eta_source: Callable[[], float | None] | None = None,
        *,
        step: float = 0.1,
        threshold: float = 0.05,
        min_keep_frac: float = 0.2,
        max_keep_frac: float = 1.0,
        min_uniform_mix: float = 0.05,
        warmup: float = 0.15,
        consolidation: float = 0.15,
        min_pairs: int = 3,
        max_pairs: int = 8,
        z: float = 2.0,
        accuracy_unit: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r}; choose from {sorted(MODES)}")
        if accuracy_tolerance < 0:
            raise ValueError(f"Invalid accuracy_tolerance: {accuracy_tolerance}")
        if not 0 < min_keep_frac <= max_keep_frac <= 1:
            raise ValueError(f"Invalid keep_frac bounds: [{min_keep_frac}, {max_keep_frac}]")
        if not 2 <= min_pairs <= max_pairs:
            raise ValueError(f"Invalid min_pairs/max_pairs: {min_pairs}, {max_pairs}")
        if accuracy_unit not in ACCURACY_UNITS:
            raise ValueError(
                f"Invalid accuracy_unit: {accuracy_unit!r}; choose from {ACCURACY_UNITS}"
            )
        self.mode = str(mode)  # an OperatingMode is its string
        self.accuracy_unit = accuracy_unit
        # builtin numbers throughout the state (see _number)
        self.accuracy_tolerance = float(accuracy_tolerance)
        self.schedule = PhaseSchedule(total_epochs, warmup, consolidation)
        self.eta_source = eta_source
        self.step_size = float(step)
        self.threshold = float(threshold)
        self.min_keep_frac, self.max_keep_frac = float(min_keep_frac), float(max_keep_frac)
        self.min_uniform_mix = float(min_uniform_mix)
        self.keep_frac, self.uniform_mix = MODES[mode]
        self.epoch = 0
        self.best_accuracy: float | None = None
        self.last_loss: float | None = None
        self.history: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self._probing = False  # is this epoch a B (probe) epoch
        self._a_etas: list[float] = []
        self._b_eta: float | None = None
        self._current: tuple[float, float, str] = (1.0, 1.0, "warmup")
        self.floor: float | None = None  # this epoch's learning floor, when it binds
        self._train_loss: float | None = None  # control_step's, recorded by observe
        self.min_pairs, self.max_pairs, self.z = int(min_pairs), int(max_pairs), float(z)
        self.warned_past_plan = False  # an epoch at or past total_epochs was warned about
        self.windowed = False  # set by the first observe_window: epoch A/B/A is then off
        self.window_state = "testing"  # or "held": the fixed schedule is held to the end
        self._windows: list[tuple[str, float]] = []  # (A|B, η) of the current test

    # --- per epoch ------------------------------------------------------------------------

    def probe_setting(self) -> tuple[float, float]:
        return max(self.min_keep_frac, self.keep_frac - self.step_size), self.uniform_mix

    def control_step(
        self, unlearned: float | None = None, train_loss: float | None = None
    ) -> tuple[float, float, str]:
        """The (keep_frac, uniform_mix, phase) to use for the coming epoch.

        ``train_loss``: the mean loss of a fixed subset of the *training* samples now, for
        the starvation guard (see :meth:`observe`): a held-out loss that rises while this one
        falls is overfitting, which no sampling setting causes or cures.

        ``unlearned``: the share of training samples not yet learned (see
        :meth:`~h3optim.LossTracker.unlearned_fraction`). In the thermodynamic phase it sets a
        **learning floor**: ``keep_frac`` is raised for the epoch to ``unlearned / (1 −
        uniform_mix)``, so that the loss-driven share can hold every sample the model has not
        learned yet. While the model is still far from fitting its data (every sample still
        teaches), cutting samples cuts learning; the floor keeps them, and A/B tests (windowed
        or epoch by epoch) pause until it no longer binds.
        """
        self.warn_past_plan()
        unlearned, train_loss = _number(unlearned), _number(train_loss)
        phase = self.schedule.phase(self.epoch)
        self.floor = None
        self._train_loss = (
            train_loss if train_loss is not None and math.isfinite(train_loss) else None
        )
        if phase != "thermodynamic":
            self._current = (1.0, 1.0, phase)
        elif self._probing and not self.windowed:
            k, u = self.probe_setting()
            self._current = (k, u, phase)
        else:
            self._current = (self.keep_frac, self.uniform_mix, phase)
        k, u, _ = self._current
        if phase == "thermodynamic" and unlearned is not None and math.isfinite(unlearned):
            floor = min(1.0, max(0.0, unlearned) / max(1.0 - u, 1e-6))
            if floor > k + 1e-9:
                self.floor = floor
                self._current = (floor, u, phase)
                self.decide(
                    "learning floor",
                    f"{unlearned:.0%} of the training samples are not learned yet: keep_frac "
                    f"{k:.2f} would leave some out; this epoch keeps {floor:.2f}",
                    before=(k, u),
                    after=(floor, u),
                    unlearned=unlearned,
                )
        return self._current

    def warn_past_plan(self, stacklevel: int = 3, who: str = "EtaController") -> None:
        """Warn, once, when the coming epoch is at or past ``total_epochs``: every such
        epoch is "consolidation" (all data, nothing sampled), which a run that outlives
        its plan (``total_epochs`` left at its default of 10, say) would not say."""
        total = self.schedule.total_epochs
        if self.epoch < total or self.warned_past_plan:
            return
        self.warned_past_plan = True
        warnings.warn(
            f"{who}: epoch {self.epoch} is at or past total_epochs={total} (10 unless "
            "given): it and every later epoch are 'consolidation', trained on all data "
            "without sampling; pass total_epochs=<the number of epochs the run trains>",
            UserWarning,
            stacklevel=stacklevel,
        )

    def get_status(self) -> dict[str, Any]:
        """The current setting (``h3-optimizer`` 0.2.0's ``get_status()``, with the keys
        that still have a meaning): ``epoch``, ``phase`` (of the epoch :meth:`control_step`
        set up last), ``keep_frac`` and ``uniform_mix`` (the controller's setting, which
        warmup and consolidation epochs do not use), ``recent_eta`` and
        ``recent_accuracy`` (the mean of the last three observed, None before any),
        ``best_accuracy`` (points) and ``window_state``."""
        etas = [h["eta"] for h in self.history if h["eta"] is not None][-3:]
        accs = [h["accuracy"] for h in self.history if h["accuracy"] is not None][-3:]
        return {
            "epoch": self.epoch,
            "phase": self._current[2],
            "keep_frac": self.keep_frac,
            "uniform_mix": self.uniform_mix,
            "recent_eta": sum(etas) / len(etas) if etas else None,
            "recent_accuracy": sum(accs) / len(accs) if accs else None,
            "best_accuracy": self.best_accuracy,
            "window_state": self.window_state,
        }

    def decide(self, what: str, why: str, **values: Any) -> None:
        """Records a change made for this epoch, and why (:meth:`get_report` lists them)."""
        self.decisions.append({"epoch": self.epoch, "change": what, "reason": why, **values})

    def _marginal_eta(
        self, eta: float | None, loss: float | None, energy: float | None
    ) -> float | None:
        # Preference: an explicit η; else ΔI from the (held-out) loss the caller reports over
        # this epoch's energy; else the source (the daemon's marginal η on training loss).
        if eta is None and loss is not None and energy and self.last_loss is not None:
            eta = (self.last_loss - loss) / LN2 / energy
        if eta is None and self.eta_source is not None:
            eta = self.eta_source()
        eta = _number(eta)
        if eta is not None and not math.isfinite(eta):
            return None
        return eta

    def observe(
        self,
        eta: float | None = None,
        accuracy: float | None = None,
        loss: float | None = None,
        energy: float | None = None,
        info: float | None = None,
        **legacy: float | None,
    ) -> None:
        """Take the epoch's figures (any may be None) and move the settings if warranted.

        The positional order is ``h3-optimizer`` 0.2.0's, and its keyword names
        ``train_loss``, ``energy_j`` and ``info_bits`` (as its ``EtaController`` example
        passes them) are taken for ``loss``, ``energy`` and ``info``.

        Args:
            eta: Marginal η of the epoch (bits/J); default from ``eta_source``, else from
                ``loss`` and ``energy``.
            accuracy: Held-out accuracy, in the run's ``accuracy_unit``.
            loss: Smoothed loss, preferably held-out (nats).
            energy: Energy of the epoch (J).
            info: Information gained this epoch (bits), recorded only.
            **legacy: ``train_loss``, ``energy_j``, ``info_bits`` (0.2.0's names).

        Raises:
            TypeError: An unknown keyword, or a figure given under both of its names.
        """
        if legacy:
            loss, energy, info = _legacy_figures(legacy, loss=loss, energy=energy, info=info)
        accuracy, loss, energy, info = (_number(x) for x in (accuracy, loss, energy, info))
        k, u, phase = self._current
        m_eta = self._marginal_eta(eta, loss, energy)
        self.history.append(
            {
                "epoch": self.epoch,
                "phase": phase,
                "keep_frac": k,
                "uniform_mix": u,
                "eta": m_eta,
                "accuracy": accuracy,
                "loss": loss,
                "energy": energy,
                "info": info,
                "train_loss": self._train_loss,  # at the epoch's start (control_step)
            }
        )
        guarded = self._guards(accuracy, phase)
        if phase == "thermodynamic" and not guarded and not self.windowed:
            if self.floor is None:
                self._steer(m_eta)
            else:
                # the epoch trained at the learning floor, neither at A nor at B: its η is
                # no evidence about either, and a pair must not span it (the next free
                # epoch begins a new A, B, A)
                self._reset_probe()
        if loss is not None and math.isfinite(loss):
            self.last_loss = loss
        self.epoch += 1

    def step(self, efficiency: float | None = None) -> None:
        """ReduceLROnPlateau-style alias: observe an epoch's η."""
        self.observe(eta=efficiency)

    # --- the decisions --------------------------------------------------------------------

    def _guards(self, accuracy: float | None, phase: str) -> bool:
        if accuracy is not None and math.isfinite(accuracy):
            acc = self._points(accuracy)
            if self.best_accuracy is None or acc > self.best_accuracy:
                self.best_accuracy = acc
            elif phase == "thermodynamic" and acc < self.best_accuracy - self.accuracy_tolerance:
                old = (self.keep_frac, self.uniform_mix)
                adopted = [d for d in self.decisions if d["change"] == "keep_frac down"]
                if self.windowed and (
                    not adopted or (self.keep_frac, self.uniform_mix) == adopted[0]["before"]
                ):
                    # the windowed controller starts from an already-safe fixed schedule and
                    # only ever backs off to it: nothing adopted (or undone), nothing to undo
                    return False
                if self.windowed:
                    # fast back-off: the setting before the first adoption was safe here
                    self.keep_frac, self.uniform_mix = adopted[0]["before"]
                else:
                    safe_k, safe_u = MODES["safe"]
                    self.keep_frac = min(
                        self.max_keep_frac, max(self.keep_frac + 2 * self.step_size, safe_k)
                    )
                    self.uniform_mix = max(self.uniform_mix, safe_u)
                self._reset_probe()
                self.window_state = "held"
                self._windows = []
                self.decide(
                    "back off toward safe",
                    f"accuracy {acc:.2f} fell more than {self.accuracy_tolerance} points below the best {self.best_accuracy:.2f}",
                    before=old,
                    after=(self.keep_frac, self.uniform_mix),
                )
                return True
        losses = [h["loss"] for h in self.history if h["loss"] is not None][-6:]
        if len(losses) == 6 and phase == "thermodynamic":
            recent, earlier = losses[3:], losses[:3]

            rising = (
                recent[-1] > recent[0]
                and _volatility(recent) > 2 * _volatility(earlier)
                and _volatility(recent) > 0.05
            )
            trains = [h["train_loss"] for h in self.history[-3:] if h.get("train_loss") is not None]
            if rising and len(trains) >= 2 and trains[-1] <= trains[0]:
                rising = False  # the training loss fell meanwhile: overfitting, not starvation
            if rising and self.uniform_mix < 1.0:
                old_u = self.uniform_mix
                self.uniform_mix = min(1.0, self.uniform_mix + 0.1)
                self.decide(
                    "raise uniform_mix",
                    "loss volatility doubled and the loss rose: samples are being starved",
                    before=old_u,
                    after=self.uniform_mix,
                )
                return True
        return False

    def _points(self, accuracy: float) -> float:
        """``accuracy`` in points (percent), read in the run's unit (``accuracy_unit``)."""
        if self.accuracy_unit == "auto" and accuracy > 1.0:
            # no fraction is above 1: the run reports percent, and so did the values read
            # as fractions until now
            self.accuracy_unit = "percent"
            if self.best_accuracy is not None:
                self.best_accuracy /= 100.0
        if self.accuracy_unit == "percent":
            return accuracy
        if accuracy > 1.0:
            raise ValueError(
                f"accuracy {accuracy} is above 1 with accuracy_unit='fraction' (pass "
                "accuracy_unit='percent' for a percent accuracy)"
            )
        return accuracy * 100.0

    def _reset_probe(self) -> None:
        self._probing = False
        self._a_etas = []
        self._b_eta = None

    def _steer(self, m_eta: float | None) -> None:
        if m_eta is None:
            if not self.decisions or self.decisions[-1]["change"] != "none":
                self.decide("none", "no fresh η: change nothing")
            return
        if self._probing:
            self._b_eta = m_eta
            self._probing = False
            return
        self._a_etas.append(m_eta)
        if self._b_eta is None:
            self._probing = self.probe_setting()[0] < self.keep_frac
            self._a_etas = self._a_etas[-1:]
            return
        # A, B, A: compare B with the mean of the A epochs on either side of it
        a = sum(self._a_etas[-2:]) / len(self._a_etas[-2:])
        b = self._b_eta
        old = (self.keep_frac, self.uniform_mix)
        if b > a * (1 + self.threshold) if a > 0 else b > a + abs(a) * self.threshold:
            self.keep_frac = self.probe_setting()[0]
            self.decide(
                "keep_frac down",
                f"probe η {b:.4g} beat {a:.4g} bits/J by more than {self.threshold:.0%}",
                before=old,
                after=(self.keep_frac, self.uniform_mix),
            )
        elif b < a * (1 - self.threshold) if a > 0 else b < a - abs(a) * self.threshold:
            self.keep_frac = min(self.max_keep_frac, self.keep_frac + self.step_size / 2)
            self.decide(
                "keep_frac up",
                f"probe η {b:.4g} lost to {a:.4g} bits/J by more than {self.threshold:.0%}",
                before=old,
                after=(self.keep_frac, self.uniform_mix),
            )
        if (self.keep_frac, self.uniform_mix) != old:
            # the right-hand A trained at the replaced setting: it cannot be the left-hand A
            # of the next triple (before: it was, so the next B was compared with a mean of
            # the old and the new setting's η); the next epoch is a fresh A
            self._reset_probe()
            return
        self._a_etas = self._a_etas[-1:]
        self._b_eta = None
        self._probing = self.probe_setting()[0] < self.keep_frac

    # --- windowed A/B ------------------------------------------------------------------------

    @property
    def window_testing(self) -> bool:
        """Whether windows still alternate A and B (the thermodynamic phase, test running)."""
        return (
            self._current[2] == "thermodynamic"
            and self.floor is None
            and self.window_state == "testing"
            and self.probe_setting()[0] < self.keep_frac
        )

    def window_setting(self) -> tuple[str, float, float]:
        """``(label, keep_frac, uniform_mix)`` of the next window: ``"A"`` (current) or ``"B"``
        (probe). Windows alternate A, B, A, ... while a test runs; A otherwise."""
        if self.window_testing and len(self._windows) % 2 == 1:
            return ("B", *self.probe_setting())
        return ("A", self.keep_frac, self.uniform_mix)

    def plan_windows(self, windows: int) -> None:
        """Before a windowed A/B test starts: hold the fixed schedule at once if the
        thermodynamic phase ahead holds fewer than ``2·max_pairs + 1`` windows.

        A test that cannot run to its end pays for its probes and, even when it adopts B, has
        few steps left to save on; a short run is better served by the safe setting it
        starts from. Does nothing once the test has observed a window, or is not running; a
        new test after an adoption is planned again.
        """
        needed = 2 * self.max_pairs + 1
        if not self.window_testing or self._windows or windows >= needed:
            return
        self.hold(
            f"the thermodynamic phase ahead holds about {windows} windows and a test needs "
            f"{needed}: the run is too short for the η loop to gather evidence",
            windows=windows,
        )

    def hold(self, why: str, **values: Any) -> None:
        """End the windowed A/B test (or never start it) and hold the current setting — the
        fixed schedule — to the end; the report says ``why``."""
        self.window_state = "held"
        self.decide(
            "hold fixed schedule",
            f"windowed A/B: {why}; holding keep_frac {self.keep_frac:.2f}, uniform_mix "
            f"{self.uniform_mix:.2f}",
            **values,
        )

    def observe_window(self, eta: float | None) -> None:
        """Take the marginal η (bits/J) of the window just trained with :meth:`window_setting`.

        ``None`` or a non-finite value changes nothing (the window is repeated).
        """
        self.windowed = True
        if not self.window_testing or eta is None or not math.isfinite(eta):
            return
        label = self.window_setting()[0]
        self._windows.append((label, float(eta)))
        if label == "A" and len(self._windows) >= 3:
            self._decide_windows()

    def _window_evidence(self) -> tuple[int, float, float]:
        """(pairs, mean, standard error) of B's relative gain over its A neighbours."""
        etas = [e for _, e in self._windows]
        a_vals = [abs(e) for lab, e in self._windows if lab == "A"]
        scale = max(sum(a_vals) / len(a_vals), 1e-300)
        rel = [
            (etas[i] - (etas[i - 1] + etas[i + 1]) / 2) / scale for i in range(1, len(etas) - 1, 2)
        ]
        n = len(rel)
        mean = sum(rel) / n
        se = math.sqrt(sum((r - mean) ** 2 for r in rel) / (n - 1) / n) if n > 1 else math.inf
        return n, mean, se

    def _decide_windows(self) -> None:
        n, mean, se = self._window_evidence()
        if n < self.min_pairs:
            return
        old = (self.keep_frac, self.uniform_mix)
        probe = self.probe_setting()
        stats = f"B−A {mean:+.1%} ± {se:.1%} over {n} window pairs"
        if mean > self.threshold and mean - self.z * se > 0:
            self.keep_frac = probe[0]
            self._windows = []
            self.decide(
                "keep_frac down",
                f"windowed A/B: keep_frac {probe[0]:.2f} beat {old[0]:.2f}: {stats}",
                before=old,
                after=(self.keep_frac, self.uniform_mix),
            )
        elif mean + self.z * se < 0:
            self.hold(
                f"keep_frac {probe[0]:.2f} lost to {old[0]:.2f} ({stats}): the η loop cannot "
                "beat the fixed schedule here"
            )
        elif n >= self.max_pairs:
            self.hold(
                f"no evidence that keep_frac {probe[0]:.2f} beats {old[0]:.2f} ({stats}): the "
                "η loop cannot beat the fixed schedule here"
            )

    # --- reporting and state ---------------------------------------------------------------

    def get_report(self) -> str:
        """Every change the controller made, and why."""
        lines = [
            f"EtaController mode={self.mode}: keep_frac {self.keep_frac:.2f}, uniform_mix {self.uniform_mix:.2f}"
        ]
        changes = [d for d in self.decisions if d["change"] != "none"]
        if not changes:
            lines.append("  no changes")
        i = 0
        while i < len(changes):
            d = changes[i]
            j = i
            while (  # consecutive epochs of a binding learning floor: one line
                d["change"] == "learning floor"
                and j + 1 < len(changes)
                and changes[j + 1]["change"] == "learning floor"
                and changes[j + 1]["epoch"] == changes[j]["epoch"] + 1
            ):
                j += 1
            if j > i:
                last = changes[j]
                first_keep, last_keep = f"{d['after'][0]:.2f}", f"{last['after'][0]:.2f}"
                kept = first_keep if first_keep == last_keep else f"{first_keep} to {last_keep}"
                lines.append(
                    f"  epochs {d['epoch']}–{last['epoch']}: learning floor — the share of "
                    f"training samples not learned yet {_moved(d['unlearned'], last['unlearned'])}"
                    f": those epochs kept {kept} instead of {d['before'][0]:.2f}"
                )
            else:
                lines.append(f"  epoch {d['epoch']}: {d['change']} — {d['reason']}")
            i = j + 1
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (its settings, history, decisions and tests in progress),
        a copy: training on does not change a state already taken."""
        return copy.deepcopy(
            {k: v for k, v in self.__dict__.items() if k not in ("eta_source", "schedule")}
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``state`` (from :meth:`state_dict`) as a copy: controllers loaded from one
        state, and the state itself, stay independent."""
        self.__dict__.update(copy.deepcopy(state))
