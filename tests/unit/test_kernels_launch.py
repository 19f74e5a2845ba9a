"""resam_kernels.launch.steps_per_program: enough programs for small batches, long chunks for large."""

import pytest

from resam_kernels.launch import MIN_PROGRAMS, steps_per_program


def test_large_batches_keep_the_longest_chunks():
    # 200 masks of 1024 x 1024 in chunks of 2048 x 16 pixels: 6400 programs
    assert steps_per_program(200, 1024 * 1024, 2048, 16) == 16


def test_small_batches_get_shorter_chunks():
    # 400 masks of 256 x 256: 16 steps give 800 programs, 2 steps 6400
    assert steps_per_program(400, 256 * 256, 2048, 16) == 2
    assert 400 * -(-256 * 256 // (2048 * 2)) >= MIN_PROGRAMS > 400 * -(-256 * 256 // (2048 * 4))
    # the mask loss's 1024-pixel steps: 4 steps give 6400 programs
    assert steps_per_program(400, 256 * 256, 1024, 16) == 4


def test_tiny_launches_go_down_to_one_step():
    assert steps_per_program(1, 100, 1024, 16) == 1
    assert steps_per_program(0, 100, 1024, 16) == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        steps_per_program(1, 100, 1024, 0)
