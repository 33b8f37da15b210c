"""Wire models: the daemon owns the format; clients speak plain JSON (OpenAPI at /docs)."""

from __future__ import annotations

import binascii
import json
import math
import time
from array import array
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# Every int is bounded before it reaches the store (SQLite integers are 64-bit), at the
# largest integer a double holds exactly: JSON tools (and JSON Schema validators) read
# numbers as doubles, so a bound above it could not be stated exactly in the OpenAPI.
INT_MAX = 2**53 - 1
CONFIG_MAX_DEPTH = 32
CONFIG_MAX_BYTES = 64 * 1024
# Unix seconds a run may claim: not before 1970, not more than a day ahead of the daemon.
FUTURE_SLACK_S = 86400.0

_T = TypeVar("_T", str, list[str | None])


def check_text(v: _T) -> _T:
    """Text the store keeps and every answer can send back, on any store: no NUL (U+0000:
    PostgreSQL's text cannot hold one, SQLite's can) and no lone surrogate (``\\ud800`` is
    valid JSON but no Unicode text: stored, it turned every answer holding it into a 500).
    ``v`` is one string, or a column of them (one C-speed pass, no Python call per value)."""
    text = v if isinstance(v, str) else "".join(filter(None, v))
    if "\x00" in text:
        raise ValueError("holds a NUL character (\\u0000), which no text field can store")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            bad = text[exc.start].encode("unicode_escape").decode()
            raise ValueError(f"holds a lone surrogate ({bad}), which is not Unicode text") from None
    return v


# Every string the daemon stores as text, or looks a row up by (the routes' path and query
# parameters too). A run's config is JSON, checked as a whole (check_config): it may hold a
# NUL, which JSON text escapes (\u0000) and PostgreSQL's json type (not jsonb) keeps.
# (A length goes before the check, in StringConstraints: after it, pydantic would check it
# as a generic length, "at most 32 items".)
CheckText = AfterValidator(check_text)
Text = Annotated[str, CheckText]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=100), CheckText]
RunName = Annotated[str, StringConstraints(max_length=200), CheckText]
Phase = Annotated[str, StringConstraints(max_length=32), CheckText]
StrictId = Annotated[int, Field(strict=True, ge=0, le=INT_MAX)]


def check_config(v: dict[str, Any]) -> dict[str, Any]:
    """A run's config: JSON of bounded depth and size, finite numbers only.

    It is returned in every list page, so a 30 MB config would be served again and again;
    NaN/inf have no JSON form and would come back as null.
    """
    stack: list[tuple[Any, int]] = [(v, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > CONFIG_MAX_DEPTH:
            raise ValueError(f"config is nested deeper than {CONFIG_MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((x, depth + 1) for x in node.values())
        elif isinstance(node, list):
            stack.extend((x, depth + 1) for x in node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise ValueError("config holds a NaN or infinite number (JSON has none)")
        elif isinstance(node, int) and not -INT_MAX <= node <= INT_MAX:
            # a JSON reader holds numbers as doubles: 1e309 written as 310 digits is inf,
            # and 2**53 + 1 comes back as 2**53
            raise ValueError(
                f"config holds an integer beyond ±{INT_MAX} (2**53 - 1), which JSON readers "
                "cannot keep exactly (send it as a string)"
            )
    size = len(json.dumps(v, separators=(",", ":")))
    if size > CONFIG_MAX_BYTES:
        raise ValueError(f"config is {size} bytes of JSON; the limit is {CONFIG_MAX_BYTES}")
    # no lone surrogate (a NUL is fine: JSON escapes it, even with ensure_ascii=False)
    check_text(json.dumps(v, separators=(",", ":"), ensure_ascii=False))
    return v


def check_timestamp(v: float | None) -> float | None:
    if v is not None and not 0.0 <= v <= time.time() + FUTURE_SLACK_S:
        raise ValueError(
            "must be Unix seconds between 1970 and a day from now "
            f"(got {v!r}); a run with such a window would claim energy it never used"
        )
    return v


def check_name(v: str | None) -> str | None:
    """A run name without its surrounding spaces (as a run reference is looked up: ``h3d
    show " a "`` finds run "a"). Only spaces is refused: no reference could name it."""
    if v is None:
        return None
    name = v.strip()
    if v and not name:
        raise ValueError("a run name needs a character that is not a space")
    return name


class Schema(BaseModel):
    """Every model of the API. Each is built at its first use, not when this module is
    imported (``defer_build``): built at import, they took about 9 ms of every daemon's
    start to a healthy /healthz (benchmarks/results/startup_phases.md), for answers that
    come later, if ever.

    Except the request bodies (``BODY``, defined with ``defer_build=False``). FastAPI builds
    a body's validator with a ``Field(alias="body")`` that pydantic warns of, and silences
    that warning only while it builds the route; built at the first request instead, the
    warning would reach the daemon's log (and fail the tests, where warnings are errors)."""

    model_config = ConfigDict(defer_build=True)


BODY = ConfigDict(extra="forbid", strict=True, defer_build=False)


class RunCreate(Schema):
    model_config = BODY

    id: str | None = Field(
        None,
        pattern="^[0-9a-f]{32}$",
        description="Client-chosen id (32 hex digits), so a run started offline keeps its id "
        "when its spool is replayed. Creating an id that exists is a 409 run_exists.",
    )
    created_at: float | None = Field(
        None, allow_inf_nan=False, description="Unix seconds; default: when the daemon receives it."
    )
    name: RunName | None = Field(
        None,
        description="Stored without surrounding spaces; absent or empty: run-<the id's first "
        "8 digits>. A name of spaces only is a 422.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description=f"JSON, at most {CONFIG_MAX_DEPTH} levels deep and {CONFIG_MAX_BYTES} "
        "bytes; numbers must be finite, integers at most 2**53 - 1 in magnitude.",
    )
    tags: list[Tag] = Field(default_factory=list, max_length=100)
    pid: int | None = Field(None, ge=0, le=INT_MAX)
    cpu_s: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="CPU seconds of process `pid` at `created_at` (user + system, waited-for "
        "children included, as `os.times()` reads them). With it the daemon counts the run's "
        "CPU share from `created_at` rather than from when this request arrived.",
    )
    host: Annotated[str, StringConstraints(max_length=255), CheckText] | None = None
    n_train: int | None = Field(
        None, ge=1, le=INT_MAX, description="Training-set size, for ΔI_total."
    )
    rank: int | None = Field(
        None,
        ge=0,
        le=INT_MAX,
        description="This process's rank in a distributed run. With a rank the create is a "
        "join: every rank sends it with the same id and world_size, on its own node's daemon; "
        "the first creates the run, the others attach to it (idempotent).",
    )
    world_size: int | None = Field(None, ge=1, le=INT_MAX, description="Ranks in the run.")
    local_rank: int | None = Field(None, ge=0, le=INT_MAX)

    @model_validator(mode="after")
    def _rank(self) -> RunCreate:
        if (self.rank is None) != (self.world_size is None):
            raise ValueError("rank and world_size go together")
        if self.rank is not None and self.world_size is not None:
            if self.rank >= self.world_size:
                raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
            if self.id is None:
                raise ValueError("a rank joins a run by its id: give id")
        return self

    _config = field_validator("config")(check_config)
    _created = field_validator("created_at")(check_timestamp)
    _name = field_validator("name")(check_name)


class RunUpdate(Schema):
    model_config = BODY

    status: Literal["finished", "failed"] | None = None
    finished_at: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Only with status: when the run (or this rank) ended; default: now. Not "
        "before the run was created (a rank: before it joined).",
    )
    name: Annotated[str, StringConstraints(min_length=1, max_length=200), CheckText] | None = Field(
        None, description="Stored without surrounding spaces."
    )
    tags: list[Tag] | None = Field(None, max_length=100)
    rank: int | None = Field(
        None,
        ge=0,
        le=INT_MAX,
        description="With status: only this rank is done. A distributed run ends when its "
        "last rank is (failed if any rank failed).",
    )

    _finished = field_validator("finished_at")(check_timestamp)
    _name = field_validator("name")(check_name)

    @model_validator(mode="after")
    def _final(self) -> RunUpdate:
        if self.finished_at is not None and self.status is None:
            raise ValueError(
                "finished_at needs a final status (finished or failed): it says when the run ended"
            )
        if self.rank is not None and self.status is None:  # it was a silent 200 that did nothing
            raise ValueError(
                "rank needs a final status (finished or failed): it says which rank ended"
            )
        return self


class RunPublic(Schema):
    id: str
    name: str
    status: str
    created_at: float
    finished_at: float | None
    config: dict[str, Any]
    tags: list[str]
    pid: int | None
    host: str | None
    n_train: int | None
    node: str | None = Field(description="The node whose daemon created the run.")
    world_size: int | None = Field(description="Ranks of a distributed run; null: one process.")
    n_batches: int
    n_epochs: int
    n_nonfinite: int
    last_seq: int | None
    last_t: float | None


class RunsPublic(Schema):
    data: list[RunPublic]
    count: int
    next_cursor: str | None


def _unpack(text: Any, width: int, name: str) -> bytes:
    """base64 text to bytes, strictly (the standard alphabet, padding only at the end); the
    bytes of a binary body's block (:func:`binary_columns`: JSON never gives bytes) as they
    are."""
    if isinstance(text, bytes):
        raw = text
    elif not isinstance(text, str):
        raise ValueError(f"{name} must be a base64 string")
    else:
        try:  # C speed: 200 of these per 100-batch request (b64decode(validate=) adds a regex)
            raw = binascii.a2b_base64(text, strict_mode=True)
        except ValueError as exc:  # binascii.Error, or a non-ASCII str
            raise ValueError(f"{name} is not valid base64") from exc
    if len(raw) % width:
        raise ValueError(
            f"{name} holds {len(raw)} bytes, not a whole number of {width}-byte values"
        )
    return raw


# A packed vector: a base64 string on the wire (and in the OpenAPI), bytes once validated:
# decoded once, in validation, and read as a plain field.
_B64 = WithJsonSchema({"type": "string"}, mode="validation")


def _packed(width: int, name: str) -> PlainValidator:
    """The validator of a packed field: ``width``-byte values, named ``name`` in errors."""
    return PlainValidator(lambda v: _unpack(v, width, name))


Float32s = Annotated[bytes, _packed(4, "losses_f32"), _B64]
Int64s = Annotated[bytes, _packed(8, "indices_i64"), _B64]
SeqI64 = Annotated[bytes, _packed(8, "seq_i64"), _B64]
TimeF64 = Annotated[bytes, _packed(8, "t_f64"), _B64]
LossF64 = Annotated[bytes, _packed(8, "loss_f64"), _B64]
SizeI64 = Annotated[bytes, _packed(8, "sizes_i64"), _B64]


class BatchIn(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)

    seq: int = Field(
        strict=True,
        ge=0,
        le=INT_MAX,
        description="Per-run sequence number: the idempotency key (a JSON integer).",
    )
    t: float = Field(
        allow_inf_nan=False, description="Unix seconds (wall clock) when the batch ended."
    )
    loss: float | None = Field(
        description="Mean loss in nats. null only with nonfinite_as_null (a NaN/inf loss)."
    )
    n: StrictId | None = None
    epoch: StrictId | None = None
    step: StrictId | None = None
    phase: Phase | None = None
    rank: int | None = Field(None, ge=0, le=INT_MAX, description="The rank that logged it.")
    losses: list[float | None] | None = Field(None, description="Per-sample losses (nats).")
    indices: list[int] | None = Field(None, description="Dataset indices of `losses`.")
    losses_f32: Float32s | None = Field(
        None,
        description="Per-sample losses packed: base64 of little-endian float32 (NaN = missing, "
        "allowed only with nonfinite_as_null). Instead of `losses`: 5 bytes of JSON a value, not ~20.",
    )
    indices_i64: Int64s | None = Field(
        None,
        description="Dataset indices packed: base64 of little-endian int64. Instead of `indices`.",
    )

    @field_validator("indices")
    @classmethod
    def _index_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and v and (min(v) < -INT_MAX or max(v) > INT_MAX):
            raise ValueError(f"an index is outside {-INT_MAX}..{INT_MAX} (±(2**53 - 1))")
        return v

    @model_validator(mode="after")
    def _lengths(self) -> BatchIn:
        # No private attributes here: pydantic initialises them in Python for every
        # instance and reads them through __getattr__ (~1.5 ms of a 100-batch request).
        if self.losses is not None and self.losses_f32 is not None:
            raise ValueError("give losses or losses_f32, not both")
        if self.indices is not None and self.indices_i64 is not None:
            raise ValueError("give indices or indices_i64, not both")
        n_losses, n_indices = self.sample_count(), self.index_count()
        if n_indices is not None and n_losses is None:
            raise ValueError("indices given without losses")
        if n_losses is not None and n_indices is not None and n_losses != n_indices:
            raise ValueError(f"losses has {n_losses} values but indices has {n_indices}")
        return self

    def packed_losses(self) -> bytes | None:
        """``losses_f32`` decoded: little-endian float32 (validation decoded it)."""
        return self.losses_f32

    def packed_indices(self) -> bytes | None:
        """``indices_i64`` decoded: little-endian int64."""
        return self.indices_i64

    def sample_count(self) -> int | None:
        if self.losses is not None:
            return len(self.losses)
        return None if self.losses_f32 is None else len(self.losses_f32) // 4

    def index_count(self) -> int | None:
        if self.indices is not None:
            return len(self.indices)
        return None if self.indices_i64 is None else len(self.indices_i64) // 8


def nonfinite_positions(values: Sequence[float]) -> list[int]:
    """Where ``values`` holds NaN or ±inf: a C-speed sum first, a scan only if it fails."""
    try:
        if math.isfinite(math.fsum(values)):
            return []
    except (OverflowError, ValueError):  # a finite sum that overflows, or -inf + inf: scan
        pass
    return [i for i, v in enumerate(values) if not math.isfinite(v)]


def _values(raw: bytes, code: str) -> array[Any]:
    a = array(code)
    a.frombytes(raw)
    return a


class BatchColumns(Schema):
    """A request's batches as columns, each packed as one base64 string: what the client
    sends (no JSON object per batch, so neither side spends Python work per batch).

    Batch ``i`` is ``seq_i64[i]``, ``t_f64[i]``, ``loss_f64[i]`` …; its per-sample losses are
    the next ``sizes_i64[i]`` values of ``losses_f32`` (−1: the batch has none) and its
    indices the same positions of ``indices_i64``.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    seq_i64: SeqI64 = Field(description="Sequence numbers, little-endian int64.")
    t_f64: TimeF64 = Field(description="Unix seconds when each batch ended, little-endian float64.")
    loss_f64: LossF64 = Field(
        description="Mean losses in nats, little-endian float64; NaN/inf only with "
        "nonfinite_as_null (stored as missing)."
    )
    sizes_i64: SizeI64 | None = Field(
        None,
        description="Per batch, how many values of losses_f32 (and indices_i64) are its "
        "own, in order; -1 for a batch without per-sample losses. Required with losses_f32.",
    )
    losses_f32: Float32s | None = Field(
        None, description="Every batch's per-sample losses, concatenated (float32, as above)."
    )
    indices_i64: Int64s | None = Field(
        None, description="Dataset indices, one for each value of losses_f32 (int64)."
    )
    n: list[StrictId | None] | None = Field(
        None, description="Samples per batch; default: its number of per-sample losses."
    )
    epoch: list[StrictId | None] | None = None
    step: list[StrictId | None] | None = None
    # check_text on the whole column: one pass, not a Python call per batch
    phase: Annotated[
        list[Annotated[str, StringConstraints(max_length=32)] | None] | None,
        AfterValidator(lambda v: v if v is None else check_text(v)),
    ] = None

    def __len__(self) -> int:
        return len(self.seq_i64) // 8

    def seqs(self) -> array[int]:
        return _values(self.seq_i64, "q")

    def times(self) -> array[float]:
        return _values(self.t_f64, "d")

    def losses(self) -> array[float]:
        return _values(self.loss_f64, "d")

    def sizes(self) -> array[int] | None:
        return None if self.sizes_i64 is None else _values(self.sizes_i64, "q")

    @model_validator(mode="after")
    def _consistent(self) -> BatchColumns:
        k = len(self)
        for name in ("t_f64", "loss_f64", "sizes_i64"):
            raw = getattr(self, name)
            if raw is not None and len(raw) // 8 != k:
                raise ValueError(f"{name} holds {len(raw) // 8} values for {k} batches")
        for name in ("n", "epoch", "step", "phase"):
            col = getattr(self, name)
            if col is not None and len(col) != k:
                raise ValueError(f"{name} holds {len(col)} values for {k} batches")
        seqs = self.seqs()
        if k and (min(seqs) < 0 or max(seqs) > INT_MAX):
            raise ValueError(f"seq_i64: a sequence number is outside 0..{INT_MAX}")
        if nonfinite_positions(self.times()):
            raise ValueError("t_f64: a time is not a finite number")
        sizes = self.sizes()
        n_losses = None if self.losses_f32 is None else len(self.losses_f32) // 4
        if (sizes is None) != (n_losses is None):
            raise ValueError("sizes_i64 and losses_f32 come together")
        if sizes is not None:
            if k and min(sizes) < -1:
                raise ValueError("sizes_i64: a size is below -1")
            total = sum(sizes) + sizes.tolist().count(-1)  # -1 counts as 0
            if total != n_losses:
                raise ValueError(f"sizes_i64 add up to {total}, losses_f32 holds {n_losses}")
        if self.indices_i64 is not None and len(self.indices_i64) // 8 != n_losses:
            raise ValueError(
                f"indices_i64 holds {len(self.indices_i64) // 8} values, losses_f32 "
                f"{n_losses or 0}: one index for each loss"
            )
        return self


#: The media type of a batches body whose packed columns travel as raw bytes, not base64:
#: the client's form (a third of its sender's work per batch was base64, held under the GIL).
COLUMNS_MEDIA_TYPE = "application/vnd.h3.columns"
#: The packed columns of :class:`BatchColumns`, in the order their bytes follow the header
#: of a :data:`COLUMNS_MEDIA_TYPE` body.
PACKED_COLUMNS = ("seq_i64", "t_f64", "loss_f64", "sizes_i64", "losses_f32", "indices_i64")


def binary_columns(body: bytes) -> dict[str, Any]:
    """The object of a :data:`COLUMNS_MEDIA_TYPE` body, as :class:`BatchesIn` validates it.

    The body is a header, one line of JSON (the object of the JSON form, with ``columns``),
    a newline, then the packed columns' bytes back to back in :data:`PACKED_COLUMNS` order.
    In the header each packed column present is given as its length in bytes instead of
    its base64 text: ``{"nonfinite_as_null":true,"columns":{"seq_i64":16,"t_f64":16,
    "loss_f64":16,"epoch":[0,0]}}``, a newline, then 48 bytes. Raises ValueError saying what
    does not fit that layout; what the columns hold is checked by the model, as in JSON.
    """
    end = body.find(b"\n")
    if end < 0:
        raise ValueError("no newline after the JSON header")
    try:
        obj = json.loads(body[:end])
    except ValueError as exc:  # invalid JSON or UTF-8
        raise ValueError(f"the header is not valid JSON ({exc})") from exc
    cols = obj.get("columns") if isinstance(obj, dict) else None
    if not isinstance(cols, dict):
        raise ValueError('the header is not a JSON object with "columns" (an object)')
    view, at = memoryview(body), end + 1
    for name in PACKED_COLUMNS:
        if name not in cols:
            continue
        size = cols[name]
        if type(size) is not int or size < 0:
            raise ValueError(f"columns.{name} must be its length in bytes, not {size!r:.40}")
        if at + size > len(body):
            raise ValueError(f"columns.{name}: {size} bytes, {len(body) - at} left in the body")
        cols[name] = view[at : at + size].tobytes()
        at += size
    if at != len(body):
        raise ValueError(f"{len(body) - at} bytes after the columns the header names")
    return dict(obj)


class BatchesIn(Schema):
    model_config = BODY

    batches: list[BatchIn] | None = Field(
        None, description="The batches, one object each. Give this or `columns`."
    )
    columns: BatchColumns | None = Field(
        None, description="The same batches as packed columns (the client's form)."
    )
    nonfinite_as_null: bool = Field(
        False,
        description=(
            "If true, a loss that was NaN/inf is sent as null and stored as missing (counted "
            "in n_nonfinite, never used in η). If false, null and non-finite losses are a 422."
        ),
    )
    rank: int | None = Field(
        None,
        ge=0,
        le=INT_MAX,
        description="The rank that logged every batch here (a batch's own rank wins).",
    )

    @model_validator(mode="after")
    def _one_form(self) -> BatchesIn:
        if (self.batches is None) == (self.columns is None):
            raise ValueError("give batches or columns (one of them)")
        return self

    def count(self) -> int:
        return len(self.columns) if self.columns is not None else len(self.batches or ())

    @classmethod
    def from_binary(cls, body: bytes) -> BatchesIn:
        """A :data:`COLUMNS_MEDIA_TYPE` body, validated; ValueError if it is not one (a
        pydantic ValidationError, a ValueError too, if its columns are not valid)."""
        return cls.model_validate(binary_columns(body))


MAX_EPOCH_METRICS = 256
MAX_METRIC_NAME_CHARS = 100
MetricName = Annotated[str, StringConstraints(max_length=MAX_METRIC_NAME_CHARS)]


class EpochIn(Schema):
    model_config = ConfigDict(extra="forbid", strict=True)

    epoch: int = Field(strict=True, ge=0, le=INT_MAX)
    t: float = Field(allow_inf_nan=False)
    phase: Phase | None = None
    accuracy: float | None = None
    loss: float | None = None
    val_loss: float | None = None
    # bounded as a config is: every report of the run serves its epochs again
    metrics: dict[MetricName, float] = Field(
        default_factory=dict,
        max_length=MAX_EPOCH_METRICS,
        description=f"Other named figures: at most {MAX_EPOCH_METRICS}, names of at most "
        f"{MAX_METRIC_NAME_CHARS} characters.",
    )

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, v: dict[str, float]) -> dict[str, float]:
        # text (check_text), checked together: a name that is not Unicode text could not
        # even be sent back in an error's location
        check_text("".join(v))
        return v


class EpochsIn(Schema):
    model_config = BODY

    epochs: list[EpochIn]


class IngestResult(Schema):
    accepted: int
    duplicates: int


class DeviceEnergy(Schema):
    device: str
    node: str
    kind: str
    source: str
    model: str
    method: str
    energy_j: float
    device_energy_j: float
    active_energy_j: float | None
    idle_power_w: float | None
    idle_note: str | None = Field(
        None, description="Why energy above idle is unknown for this device (null when known)."
    )
    share: float
    attribution: str
    n_samples: int
    covered_s: float
    gaps_s: float
    granularity_s: float | None = Field(description="How often the device's reading changes.")
    below_granularity: bool = Field(
        description="The window is shorter than the device's update period: the figure is "
        "interpolated between updates, not resolved."
    )
    caveat: str | None = Field(
        None, description="What this device's figure cannot see (e.g. part-time power sensors)."
    )


class NodeEnergy(Schema):
    node: str
    energy_j: float
    device_energy_j: float
    ranks: list[int]


class RankEnergy(Schema):
    rank: int
    node: str
    energy_j: float
    n_batches: int
    status: str


class EnergyPublic(Schema):
    run_id: str
    energy_j: float | None = Field(description="Attributed to the run (its share of devices).")
    device_energy_j: float | None = Field(description="Whole devices over the run's window.")
    active_energy_j: float | None = Field(
        description="Attributed energy above each device's idle baseline; null, with "
        "active_energy_note saying why, when a baseline is missing or was not idle."
    )
    active_energy_note: str | None = None
    source: str
    measured: bool
    t_start: float
    t_end: float
    duration_s: float
    by_device: list[DeviceEnergy]
    by_node: list[NodeEnergy] = Field(
        description="Per node: its devices once, times the share of all the run's ranks there."
    )
    by_rank: list[RankEnergy] = Field(
        description="Per rank of a distributed run: its own part of its node's share."
    )
    co2e_g: float | None = Field(
        None,
        description="Grams of CO2e: the run's energy over time x the grid intensity then "
        "(null when no intensity is configured; never guessed).",
    )
    carbon_source: str = Field(
        "none", description="constant | region_average | timeseries | live | none"
    )
    carbon_detail: str = Field("", description="Data set, zone or file; any fallback taken.")


class EtaPublic(Schema):
    run_id: str
    eta_bits_per_j: float | None
    marginal_eta_bits_per_j: float | None = Field(
        description="Bits/J over the last window_s seconds; negative when the smoothed loss "
        "rose over the window (the model got worse on its training data there)."
    )
    window_s: float
    window_is_whole_run: bool = Field(
        False, description="The run is shorter than the window: the marginal η is the whole run's."
    )
    info_gain_bits: float | None
    info_gain_total_bits: float | None
    loss_start: float | None
    loss_now: float | None
    energy_j: float | None
    active_energy_j: float | None
    window_energy_j: float | None
    source: str
    measured: bool
    smoothing_batches: int
    t: float


Point = Annotated[list[float], Field(min_length=2, max_length=2)]


class SeriesPublic(Schema):
    run_id: str
    metric: str
    points: list[Point] = Field(description="[x, y] pairs: x in Unix seconds.")
    bucket_batches: int | None = Field(
        None,
        description="agg=mean: the batches (global steps, for a distributed run) averaged into "
        "each point; the last point's may hold fewer. Null otherwise.",
    )


class ErrorBody(Schema):
    code: str
    message: str
    details: Any = None


class ErrorPublic(Schema):
    error: ErrorBody
