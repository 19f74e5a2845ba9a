"""FIFO embedding queue: order, overflow, checkpoint round trip, single-process all-rank push."""

import io

import pytest
import torch

from resam_dist.resam.queue import EmbeddingQueue


def tagged(first: int, count: int, dim: int = 3) -> torch.Tensor:
    """count x dim rows whose every entry is the row's id (first, first + 1, ...)."""
    ids = torch.arange(first, first + count, dtype=torch.float32)
    return ids.unsqueeze(1).expand(count, dim).clone()


def ids_of(keys: torch.Tensor) -> list[int]:
    return [int(v) for v in keys[:, 0].tolist()]


def test_fifo_order_and_overflow():
    queue = EmbeddingQueue(4, 3)
    assert queue.keys().shape == (0, 3)
    queue.push(tagged(0, 3))
    assert ids_of(queue.keys()) == [0, 1, 2]
    queue.push(tagged(3, 3))  # wraps: 0 and 1 are dropped
    assert ids_of(queue.keys()) == [2, 3, 4, 5]
    assert len(queue) == 4
    queue.push(tagged(6, 1))
    assert ids_of(queue.keys()) == [3, 4, 5, 6]
    queue.push(tagged(7, 6))  # more than the size in one push: the last 4 stay
    assert ids_of(queue.keys()) == [9, 10, 11, 12]
    queue.push(tagged(13, 0))  # nothing to push
    assert ids_of(queue.keys()) == [9, 10, 11, 12]


def test_keys_are_a_copy_and_push_detaches():
    queue = EmbeddingQueue(2, 3)
    source = tagged(0, 2).requires_grad_(True)
    queue.push(source)
    keys = queue.keys()
    assert not keys.requires_grad
    keys.zero_()
    assert ids_of(queue.keys()) == [0, 1]


def test_state_dict_round_trip_exact():
    queue = EmbeddingQueue(5, 3)
    queue.push(tagged(0, 7))  # wrapped: pointer is not at 0
    buffer = io.BytesIO()
    torch.save(queue.state_dict(), buffer)
    buffer.seek(0)
    restored = EmbeddingQueue(5, 3)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored.keys(), queue.keys())
    assert len(restored) == len(queue) == 5
    # the write pointer came back too: the next pushes evict the same entries
    queue.push(tagged(100, 2))
    restored.push(tagged(100, 2))
    assert ids_of(restored.keys()) == ids_of(queue.keys()) == [4, 5, 6, 100, 101]

    partial = EmbeddingQueue(5, 3)
    partial.push(tagged(0, 2))
    again = EmbeddingQueue(5, 3)
    again.load_state_dict(partial.state_dict())
    assert len(again) == 2 and ids_of(again.keys()) == [0, 1]


def test_load_state_dict_rejects_other_shapes():
    small = EmbeddingQueue(3, 3)
    with pytest.raises(ValueError, match="queue_size"):
        EmbeddingQueue(4, 3).load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        EmbeddingQueue(3, 3).load_state_dict({"size": 3})
    with pytest.raises(ValueError, match="N x 3"):
        small.push(torch.zeros(2, 4))


def test_push_all_ranks_single_process_is_push():
    queue = EmbeddingQueue(4, 3)
    queue.push_all_ranks(tagged(0, 3))
    assert ids_of(queue.keys()) == [0, 1, 2]


def test_zero_size_queue_stays_empty():
    queue = EmbeddingQueue(0, 3)
    queue.push(tagged(0, 3))
    assert queue.keys().shape == (0, 3)
    restored = EmbeddingQueue(0, 3)
    restored.load_state_dict(queue.state_dict())
    assert len(restored) == 0
