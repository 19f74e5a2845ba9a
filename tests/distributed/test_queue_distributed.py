"""One SSA queue for all ranks: 2 gloo ranks push their (differently sized) weak-view embeddings
every step; the queues end bitwise identical on both ranks and equal to a single-process replay
of the same pushes in rank order."""

import torch
import pytest

from resam_dist.resam.queue import EmbeddingQueue
from train_helpers import BIN, REPO, free_port, run, write_config

pytestmark = pytest.mark.distributed

STEPS = 3
QUEUE_SIZE = 32  # small enough to wrap around within STEPS


def test_queue_is_identical_on_all_ranks_and_equals_a_replay(train_shards, tmp_path):
    config = write_config(tmp_path / "config.json", shards=train_shards, output_dir=tmp_path / "run",
                          overrides={"resam.queue_size": QUEUE_SIZE})
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(REPO / "tests" / "distributed" / "queue_worker.py"), str(config), str(tmp_path), str(STEPS)]
    result = run(cmd, log=tmp_path / "worker.log", timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]

    states = [torch.load(tmp_path / f"queue_rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert states[0]["fill"] == states[1]["fill"] == QUEUE_SIZE
    assert states[0]["pointer"] == states[1]["pointer"]
    assert torch.equal(states[0]["entries"], states[1]["entries"])

    replay = EmbeddingQueue(QUEUE_SIZE, states[0]["dim"])
    counts = []
    for step in range(STEPS):
        for rank in range(2):
            pushed = torch.load(tmp_path / f"push_step{step}_rank{rank}.pt", weights_only=True)
            counts.append(pushed.shape[0])
            replay.push(pushed)
    assert sum(counts) > QUEUE_SIZE                         # the ring wrapped
    assert len(set(counts)) > 1                             # the ranks pushed different counts
    expected = replay.state_dict()
    assert states[0]["pointer"] == expected["pointer"]
    assert torch.equal(states[0]["entries"], expected["entries"])
