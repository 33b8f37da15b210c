"""Which rank this process is, and which run all the ranks of one job share.

Every rank's profiler joins one run. The run id is, in order of preference:

1. the ``run_id`` the caller passed;
2. derived from the launcher's job id, identical on every rank without talking to them:
   torchrun's ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; ``--standalone`` and single-node
   launches make a fresh one) with its restart count, else SLURM's ``SLURM_JOB_ID`` and
   ``SLURM_STEP_ID`` (one per ``srun``), with torchrun's restart count when torchrun's
   static rendezvous runs inside the SLURM job (each elastic restart is a new run). Inside a
   SLURM job the key also holds the job's ``SLURM_RESTART_COUNT`` (a requeued job is a new
   run) and, under torchrun, the job and step ids (a fixed ``--rdzv-id`` is the same in
   every step). The k-th profiler of one name in a process (from 0) adds k to the key from
   the second on, so that a second profiler in one launch (a sweep, ``trainer.train()``
   twice) opens a run of its own: ranks create their profilers in the same order;
3. agreed over the default ``torch.distributed`` process group: rank 0 draws an id and
   broadcasts it (a collective: every rank must create its profiler).

Only torch that the caller already imported is used; this module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from h3client.errors import H3ClientError

# uuid5 namespace of H3 run ids derived from a launcher's job id.
_NAMESPACE = "5b0c1c86-3a53-4a4e-9d0e-6f1b0d8f3e11"

# Step ids that are no ``srun`` step: the batch script's, the extern and the interactive
# (``salloc``) steps, a pending one; Slurm gives them the top values of 32 bits
# (0xfffffffa and up; names in some environments). A process there is one process,
# whatever SLURM_NTASKS says.
_NOT_A_STEP = 0xFFFFFFF0

# Profilers whose run id was derived, by job key and name: the k-th gets a run of its own.
_derived: dict[tuple[str, str], int] = {}
_derived_lock = threading.Lock()


@dataclass(frozen=True)
class RankInfo:
    """One process's place in a distributed job."""

    rank: int
    world_size: int
    local_rank: int | None
    launcher: str  # "torchrun" | "slurm" | "explicit"
    job_key: str | None  # launcher job id (unique per launch), None when there is none


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise H3ClientError(f"{key}={value!r} is not an integer") from exc


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an ``srun`` step (not the batch script, nor an
    ``salloc`` shell, whose environment holds SLURM_PROCID and SLURM_NTASKS too)."""
    step = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    try:
        return 0 <= int(step) < _NOT_A_STEP
    except ValueError:  # unset, or "batch", "extern", "interactive"
        return False


def _slurm_key(env: Mapping[str, str], job: str) -> str:
    key = f"slurm:{job}:{env.get('SLURM_STEP_ID', '')}"
    requeue = env.get("SLURM_RESTART_COUNT", "").strip()
    if requeue not in ("", "0"):  # a requeued job (preempted, a node failed) is a new run
        key += f":requeue{requeue}"
    return key


def _job_key(env: Mapping[str, str]) -> str | None:
    run = env.get("TORCHELASTIC_RUN_ID")
    job = env.get("SLURM_JOB_ID")
    if run and run != "none":  # "none": torchrun's static rendezvous without --rdzv-id
        key = f"torchrun:{run}:{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if job:  # a fixed --rdzv-id ($SLURM_JOB_ID, 100) is the same in every step
            key += "|" + _slurm_key(env, job)
        return key
    if job:
        key = _slurm_key(env, job)
        restart = env.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None:  # torchrun inside the job: a restart is a new run
            key += f":restart{restart}"
        return key
    return None


def detect(
    env: Mapping[str, str] | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
) -> RankInfo | None:
    """The rank of this process, or None for a single-process run.

    Explicit arguments win; then torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; then,
    in a task of an ``srun`` step only, SLURM's ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
    (else ``SLURM_NTASKS``) and ``SLURM_LOCALID``. The batch script and an ``salloc`` shell
    are one process, though Slurm exports SLURM_PROCID=0 and the job's SLURM_NTASKS there.

    Raises:
        H3ClientError: the rank is out of range, or only one of rank and world size is given.
    """
    env = os.environ if env is None else env
    launcher = "explicit"
    if rank is None and world_size is None:
        if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
            launcher = "torchrun"
            rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
            local_rank = _int(env, "LOCAL_RANK") if local_rank is None else local_rank
        elif env.get("SLURM_PROCID") is not None and _in_slurm_step(env):
            tasks = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
            if env.get(tasks) is not None:
                launcher = "slurm"
                rank, world_size = _int(env, "SLURM_PROCID"), _int(env, tasks)
                local_rank = _int(env, "SLURM_LOCALID") if local_rank is None else local_rank
    if rank is None and world_size is None:
        return None
    if rank is None or world_size is None:
        raise H3ClientError("give both rank and world_size, or neither")
    if world_size < 1 or not 0 <= rank < world_size:
        raise H3ClientError(f"rank {rank} is not in a world of size {world_size}")
    if world_size == 1:
        return None
    return RankInfo(rank, world_size, local_rank, launcher, _job_key(env))


def derived_run_id(job_key: str, name: str | None, k: int = 0) -> str:
    """The run id every rank of one launch computes alike (32 hex digits) for its ``k``-th
    profiler named ``name`` (from 0)."""
    import uuid

    text = f"{job_key}|{name or ''}" + (f"|{k}" if k else "")
    return uuid.uuid5(uuid.UUID(_NAMESPACE), text).hex


def next_index(info: RankInfo, name: str | None) -> int:
    """How many profilers named ``name`` this process created in ``info``'s launch before
    this one (counted here: call it once a profiler)."""
    key = (info.job_key or "", name or "")
    with _derived_lock:
        k = _derived.get(key, 0)
        _derived[key] = k + 1
        return k


def _agree_over_group(world_size: int) -> str | None:
    """Rank 0's fresh id, broadcast over the default process group; None without one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() != world_size:
        raise H3ClientError(
            f"the process group has {dist.get_world_size()} ranks, the profiler was told "
            f"{world_size}"
        )
    box: list[str | None] = [os.urandom(16).hex() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shared_run_id(info: RankInfo, name: str | None, k: int = 0) -> str:
    """The run id all ranks agree on (see the module docstring), for the ``k``-th profiler
    named ``name`` of this process (``next_index``).

    Raises:
        H3ClientError: no job id and no initialised process group to agree over.
    """
    if info.job_key is not None:
        return derived_run_id(info.job_key, name, k)
    agreed = _agree_over_group(info.world_size)
    if agreed is not None:
        return agreed
    raise H3ClientError(
        f"rank {info.rank} of {info.world_size}: cannot tell which run the other ranks join. "
        "Call torch.distributed.init_process_group() before creating the profiler, launch "
        "with torchrun --rdzv-id or srun, or pass the same run_id on every rank."
    )
