"""The CUDA device of a rank (`distributed.cuda_device_index`) and the DeepSpeed options refused on
a rank bound to one GPU (`distributed.check_node_local_options`): pure, so they run without GPUs."""

import pytest
import torch

from resam_dist.distributed import DistInfo, check_node_local_options, cuda_device_index


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_a_rank_that_sees_every_gpu_of_its_node_takes_its_local_rank(local_rank):
    assert cuda_device_index(local_rank, 8) == local_rank


@pytest.mark.parametrize("local_rank", [0, 1, 5])
def test_a_rank_bound_to_one_gpu_takes_the_one_it_sees(local_rank, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", str(local_rank))
    assert cuda_device_index(local_rank, 1) == 0


def test_the_only_rank_of_a_one_gpu_machine_takes_it(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cuda_device_index(0, 1) == 0


def test_a_second_rank_on_a_one_gpu_machine_without_binding_is_refused(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this process sees 1 CUDA device\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES=<unset>\)"):
        cuda_device_index(1, 1)


@pytest.mark.parametrize("local_rank, visible", [(2, 2), (4, 3), (-1, 4)])
def test_a_local_rank_beyond_the_visible_gpus_is_refused(local_rank, visible, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(index) for index in range(visible)))
    with pytest.raises(ValueError, match=rf"LOCAL_RANK={local_rank} but this process sees {visible} CUDA "
                                         r"device\(s\) \(CUDA_VISIBLE_DEVICES=0,1"):
        cuda_device_index(local_rank, visible)


def info(local_rank: int, device: torch.device) -> DistInfo:
    return DistInfo(rank=local_rank, world_size=8, local_rank=local_rank, device=device, backend="nccl")


@pytest.mark.parametrize("section, key", [("checkpoint", "use_node_local_storage"),
                                          ("zero_optimization", "pipeline_loading_checkpoint")])
def test_node_local_deepspeed_options_are_refused_on_a_bound_rank_only(section, key):
    ds_config = {section: {key: True}, "train_batch_size": 8}
    with pytest.raises(ValueError, match=rf"cfg.json: key 'deepspeed.{section}.{key}' needs ranks that see "
                                         r"all of their node's GPUs, but ranks of this job see only their own"):
        check_node_local_options(ds_config, info(3, torch.device("cuda", 0)), "cfg.json")
    check_node_local_options(ds_config, info(3, torch.device("cuda", 3)), "cfg.json")  # sees the node's GPUs
    check_node_local_options(ds_config, info(0, torch.device("cuda", 0)), "cfg.json")
    check_node_local_options(ds_config, info(3, torch.device("cpu")), "cfg.json")
    check_node_local_options({section: {key: False}}, info(3, torch.device("cuda", 0)), "cfg.json")
    check_node_local_options({section: None}, info(3, torch.device("cuda", 0)), "cfg.json")


def test_init_distributed_twice_returns_the_first_setup_until_closed(monkeypatch):
    """A second call keeps the first call's local rank, even after LOCAL_RANK was rewritten for
    DeepSpeed; close() forgets it."""
    from resam_dist import distributed
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already up in this process")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
                 "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown undoes what init_distributed sets
        monkeypatch.delenv(name)
    first = distributed.init_distributed(60, local_rank_arg=0)
    try:
        monkeypatch.setenv("LOCAL_RANK", "5")
        assert distributed.init_distributed(60) is first and first.world_size == 1 and first.local_rank == 0
    finally:
        distributed.close()
    monkeypatch.setenv("LOCAL_RANK", "0")
    second = distributed.init_distributed(60)
    try:
        assert second is not first and second.rank == 0
    finally:
        distributed.close()


def test_deepspeeds_own_groups_get_the_configured_timeout(one_rank_world):
    """DeepSpeed's data-parallel group (ZeRO's gradient reduction) is a group of its own, made
    without a timeout: it takes the configured one, not torch's 30-minute default."""
    import datetime
    from pathlib import Path

    import deepspeed
    from torch.distributed import distributed_c10d

    from resam_dist import distributed
    from resam_dist.config import load_config
    from resam_dist.train.engine import _disable_deepspeed_shm_build, initialize_deepspeed
    one_rank_world(7)
    try:
        _disable_deepspeed_shm_build()
        model = torch.nn.Linear(4, 1)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                  "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                          config=config, dist_init_required=False)
        group = engine.optimizer.dp_process_group
        assert group is not torch.distributed.group.WORLD
        timeout = group._get_backend(torch.device("cpu")).options._timeout  # (torch keeps it there)
        assert timeout == datetime.timedelta(seconds=7)
        # a key DeepSpeed's own config models refuse names the config file
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.json")
        with pytest.raises(ValueError, match=r"(?s)demo\.json: DeepSpeed refuses the 'deepspeed' block: .*stgae"):
            initialize_deepspeed(cfg, model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                 config={**config, "zero_optimization": {"stgae": 2}}, dist_init_required=False)
    finally:
        distributed.close()
    assert distributed_c10d.default_pg_timeout == datetime.timedelta(minutes=30)  # torch's own, back


def test_only_a_task_of_a_multi_task_srun_step_takes_its_rank_from_slurm():
    from resam_dist.distributed import srun_task_environment

    step = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}
    assert srun_task_environment(step) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    # the batch script's own process: the job has 8 tasks, its step one (or no step count at all)
    assert srun_task_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    assert srun_task_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}) is None
    # a launcher set RANK (torchrun under srun): its environment wins
    assert srun_task_environment({**step, "RANK": "2"}) is None
    # a step of 4 tasks in a job of 8: the world is the step
    assert srun_task_environment({**step, "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3"})["WORLD_SIZE"] == "4"
