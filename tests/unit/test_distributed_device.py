"""The CUDA device of a rank: `distributed.cuda_device_index` (pure, so it runs without GPUs)."""

import pytest

from resam_dist.distributed import cuda_device_index


@pytest.mark.parametrize("local_rank", [0, 3, 7])
def test_a_rank_that_sees_every_gpu_of_its_node_takes_its_local_rank(local_rank):
    assert cuda_device_index(local_rank, 8) == local_rank


@pytest.mark.parametrize("local_rank", [0, 1, 5])
def test_a_rank_bound_to_one_gpu_takes_the_one_it_sees(local_rank):
    assert cuda_device_index(local_rank, 1) == 0


@pytest.mark.parametrize("local_rank, visible", [(2, 2), (4, 3), (-1, 4)])
def test_a_local_rank_beyond_the_visible_gpus_is_refused(local_rank, visible, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(index) for index in range(visible)))
    with pytest.raises(ValueError, match=rf"LOCAL_RANK={local_rank} but this process sees {visible} CUDA "
                                         r"devices \(CUDA_VISIBLE_DEVICES=0,1"):
        cuda_device_index(local_rank, visible)
