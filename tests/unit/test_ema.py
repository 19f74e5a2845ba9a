"""The EMA teacher's averages, its weight swap, and its checkpoint state."""

import pytest
import torch

from resam_dist.train.ema import EmaTeacher, resume_notice


def parameters(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in ((3, 5), (7,))]


def test_update_is_the_exponential_moving_average_in_float32():
    weights = parameters(torch.bfloat16)
    teacher = EmaTeacher(weights, decay=0.9)
    start = [w.detach().float().clone() for w in weights]
    assert all(a.dtype == torch.float32 and torch.equal(a, s) for a, s in zip(teacher.averages, start))
    expected = [s.clone() for s in start]
    for step in range(3):
        with torch.no_grad():
            for w in weights:
                w.add_(1.0)
        teacher.update()
        expected = [0.9 * e + 0.1 * w.detach().float() for e, w in zip(expected, weights)]
    for average, value in zip(teacher.averages, expected):
        torch.testing.assert_close(average, value, rtol=1e-6, atol=1e-6)
    # a float32 average keeps updates that bf16 would round away
    assert not torch.equal(teacher.averages[0].bfloat16().float(), teacher.averages[0])


def test_weights_swaps_the_averages_in_and_restores_bit_for_bit_even_on_error():
    weights = parameters()
    teacher = EmaTeacher(weights, decay=0.5)
    teacher.averages = [a + 1.0 for a in teacher.averages]
    before = [w.detach().clone() for w in weights]
    with teacher.weights():
        assert all(torch.equal(w, a) for w, a in zip(weights, teacher.averages))
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    with pytest.raises(RuntimeError, match="inside"):
        with teacher.weights():
            raise RuntimeError("inside")
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    # a swap that fails part-way (the second tensor's average does not fit) restores the first too
    teacher.averages[1] = torch.zeros(3)
    with pytest.raises(RuntimeError):
        with teacher.weights():
            pass
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_state_round_trip_and_mismatch():
    teacher = EmaTeacher(parameters(), decay=0.99)
    teacher.averages = [a * 3 for a in teacher.averages]
    state = teacher.state_dict()
    other = EmaTeacher(parameters(), decay=0.9)
    other.load_state_dict(state, source="ckpt")
    assert other.decay == 0.9 and all(torch.equal(a, b) for a, b in zip(other.averages, teacher.averages))
    wrong = EmaTeacher([torch.nn.Parameter(torch.zeros(2, 2))], decay=0.9)
    with pytest.raises(ValueError, match="ckpt: the EMA teacher's averages do not fit"):
        wrong.load_state_dict(state, source="ckpt")
    with pytest.raises(ValueError, match="decay must lie in"):
        EmaTeacher(parameters(), decay=1.0)


def test_zero3_partitions_are_refused():
    weights = parameters()
    weights[1].ds_id = 7  # what DeepSpeed's ZeRO-3 sets on the parameters it partitions
    with pytest.raises(ValueError, match="needs whole weights"):
        EmaTeacher(weights, decay=0.9)


def test_resume_notice_refuses_missing_averages_and_tells_of_a_changed_teacher():
    saved = EmaTeacher(parameters(), decay=0.9).state_dict()
    assert resume_notice(None, 0.0, source="ckpt") is None  # no EMA before, none now
    assert resume_notice(saved, 0.9, source="ckpt") is None  # the same teacher
    with pytest.raises(ValueError, match="ckpt has no EMA teacher"):
        resume_notice(None, 0.9, source="ckpt")
    dropped = resume_notice(saved, 0.0, source="ckpt")
    assert dropped.startswith("ckpt holds an EMA teacher (decay 0.9)") and "live student" in dropped
    changed = resume_notice(saved, 0.99, source="ckpt")
    assert "decay 0.9" in changed and "resam.teacher_ema 0.99" in changed
