"""Process-group set-up and the few collectives the trainer needs.

Ranks come from the launcher's environment (`deepspeed`, `torchrun`, Slurm + torchrun all set
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under a bare `srun` with several
tasks in its step, SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID stand in for them). Without any of them the
process is a world of one on a free loopback port. The device is chosen by the LOCAL rank (one GPU per local rank;
a task whose CUDA_VISIBLE_DEVICES leaves it one GPU, as Slurm's per-task GPU binding does, uses that one), the data
shard by the GLOBAL rank.

`init_distributed` creates the torch.distributed group itself (gloo on CPU, nccl on CUDA) with the
configured timeout, so that a rank that dies ends the job with an error after at most that long
instead of hanging it. DeepSpeed then makes its own groups from it (its data-parallel group, which
carries ZeRO's gradient reduction and parameter gathers, is a `new_group` of all ranks) without a
timeout, so they would wait torch's default (30 minutes on gloo, 10 on NCCL): the configured
timeout is made the default of every group created after it as well.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int           # global rank: selects the data shard
    world_size: int
    local_rank: int     # rank on this node: selects the device and the metrics port
    device: torch.device
    backend: str        # "gloo" or "nccl"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of a rank with this local rank when its process sees `visible_devices`
    GPUs: the local rank's own device where the process sees the node's GPUs, or device 0 where
    CUDA_VISIBLE_DEVICES leaves it one GPU (its own: a Slurm task bound to one GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible_devices == 1 and (local_rank == 0 or visible is not None):
        return 0
    if not 0 <= local_rank < visible_devices:
        raise ValueError(f"LOCAL_RANK={local_rank} but this process sees {visible_devices} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={'<unset>' if visible is None else visible}): start one "
                         "rank per GPU, each seeing either all of its node's GPUs or only its own through "
                         "CUDA_VISIBLE_DEVICES")
    return local_rank


_INFO: DistInfo | None = None  # what init_distributed set up, until close()


def srun_task_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """RANK, WORLD_SIZE and LOCAL_RANK of a process that srun started as one task of a step of
    several (SLURM_STEP_NUM_TASKS > 1), when no launcher set RANK; else None. A process started by
    the batch script itself (its step has one task, though SLURM_NTASKS counts the job's) is a world
    of one."""
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return None
    try:
        step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return None
    if step_tasks <= 1:
        return None
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(step_tasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}


def init_distributed(timeout_s: int, *, local_rank_arg: int | None = None) -> DistInfo:
    """Initialise torch.distributed from the launcher's environment (idempotent: a second call
    returns the first one's DistInfo).

    timeout_s: timeout of every collective (config `train.collective_timeout_s`).
    local_rank_arg: `--local_rank` as the deepspeed launcher passes it; LOCAL_RANK wins when set.
    """
    global _INFO
    if timeout_s <= 0:
        raise ValueError(f"collective timeout must be positive, got {timeout_s} s (train.collective_timeout_s)")
    if (_INFO is not None and dist.is_initialized() and dist.get_rank() == _INFO.rank
            and dist.get_world_size() == _INFO.world_size):
        return _INFO
    srun_task = srun_task_environment(os.environ)
    if srun_task is not None:
        # one srun task per rank (`srun python launch/train.py`, deepspeed --launcher slurm)
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("srun started several tasks but MASTER_ADDR/MASTER_PORT are not set: export them "
                             "(the first host of the job and a free port) before srun")
        os.environ["RANK"] = srun_task["RANK"]
        os.environ["WORLD_SIZE"] = srun_task["WORLD_SIZE"]
        os.environ.setdefault("LOCAL_RANK", srun_task["LOCAL_RANK"])
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("LOCAL_RANK", str(local_rank_arg or 0))
    global_rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    if "LOCAL_RANK" not in os.environ and local_rank_arg is None and "SLURM_LOCALID" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    if "LOCAL_RANK" not in os.environ and local_rank_arg is None and world > 1:
        raise ValueError(f"RANK={global_rank} of WORLD_SIZE={world} but no LOCAL_RANK (nor --local_rank, nor "
                         "SLURM_LOCALID): the device and metrics port of this rank are unknown; start the job "
                         "with torchrun, the deepspeed launcher or srun")
    local = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0)
    os.environ["LOCAL_RANK"] = str(local)  # DeepSpeed reads it (on CUDA: the device index, below)
    if not 0 <= global_rank < world:
        raise ValueError(f"RANK={global_rank} is outside WORLD_SIZE={world}")

    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_device_index(local, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        # DeepSpeed takes LOCAL_RANK as the device index (engine, ZeRO-3 utilities): 0 where this
        # process sees one GPU; `local` still picks the metrics port
        os.environ["LOCAL_RANK"] = str(device.index)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"

    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=global_rank, world_size=world, timeout=timeout, **kwargs)
        set_default_group_timeout(timeout)
    _INFO = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                     device=device, backend=backend)
    return _INFO


_TORCH_GROUP_TIMEOUTS: dict[str, datetime.timedelta] = {}  # torch's own defaults, until close() restores them


def set_default_group_timeout(timeout: datetime.timedelta) -> None:
    """Makes `timeout` the timeout of every process group created later without one (`new_group`
    takes torch's module defaults then: DeepSpeed's groups are made that way), until `close()`."""
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # (the NCCL one is None without NCCL)
        current = getattr(distributed_c10d, name, None)
        if isinstance(current, datetime.timedelta):
            _TORCH_GROUP_TIMEOUTS.setdefault(name, current)
            setattr(distributed_c10d, name, timeout)


# DeepSpeed options that take LOCAL_RANK as the rank within the node (which rank of a node writes
# or loads); a rank bound to one GPU has LOCAL_RANK 0 for DeepSpeed (its device index)
NODE_LOCAL_DEEPSPEED_OPTIONS = (("checkpoint", "use_node_local_storage"),
                                ("zero_optimization", "pipeline_loading_checkpoint"))


def check_node_local_options(deepspeed_config: dict, info: DistInfo, source: str) -> None:
    """Refuses DeepSpeed's node-local options when any rank sees only its own GPU (its device index
    differs from its local rank): DeepSpeed would take every such rank for its node's first (all
    of them write the node's checkpoint files, or wait on sends no rank makes). Every rank
    decides alike: with an option set, the ranks agree through one all-reduce."""
    options = [f"{section}.{key}" for section, key in NODE_LOCAL_DEEPSPEED_OPTIONS
               if (deepspeed_config.get(section) or {}).get(key)]
    if not options:
        return
    bound = info.device.type == "cuda" and info.device.index != info.local_rank
    if is_initialized() and info.world_size > 1:
        flag = torch.tensor([int(bound)], device="cpu" if dist.get_backend() == "gloo" else info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bound = bool(flag.item())
    if bound:
        raise ValueError(f"{source}: key 'deepspeed.{options[0]}' needs ranks that see all of their node's "
                         "GPUs, but ranks of this job see only their own (CUDA_VISIBLE_DEVICES); drop the key "
                         "or give every task all of its node's GPUs")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_variable(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs per rank.

    tensor: N_r x ... on this rank (same trailing shape, dtype and device kind on every rank).
    Returns the list of every rank's tensor, in rank order (N_0 x ..., N_1 x ..., ...). Without a
    process group (or a world of one) the list holds `tensor` alone.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return [tensor]
    world = dist.get_world_size()
    tensor = tensor.contiguous()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)  # 1
    counts = torch.zeros(world, dtype=torch.int64, device=tensor.device)  # world
    dist.all_gather_into_tensor(counts, count)
    sizes = counts.tolist()  # one device-to-host copy for all ranks
    largest = max(sizes)
    trailing = tuple(tensor.shape[1:])
    if largest == 0:
        return [tensor.new_zeros((0, *trailing)) for _ in range(world)]
    padded = tensor.new_zeros((largest, *trailing))  # max(N) x ...
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [chunk[:size] for chunk, size in zip(gathered, sizes)]


def close() -> None:
    """Destroy the process group and give torch back its default group timeouts (safe to call twice)."""
    global _INFO
    _INFO = None
    if is_initialized():
        dist.destroy_process_group()
    from torch.distributed import distributed_c10d
    for name, value in _TORCH_GROUP_TIMEOUTS.items():
        setattr(distributed_c10d, name, value)
    _TORCH_GROUP_TIMEOUTS.clear()
