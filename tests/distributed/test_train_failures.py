"""A rank that hangs (SIGSTOP: alive, silent, its sockets open) must not hang the job: the other
rank's next collective times out after train.collective_timeout_s and it exits non-zero with a
message. (A rank that dies outright is covered in test_train_resume.py.)"""

from __future__ import annotations

import signal

import pytest

from train_helpers import signal_rank_after_step, start_ranks, write_config

pytestmark = pytest.mark.distributed

TIMEOUT_S = 15


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(train_shards, tmp_path):
    config = write_config(tmp_path / "config.json", shards=train_shards, output_dir=tmp_path / "run", overrides={
        "deepspeed.zero_optimization.stage": 2, "train.max_steps": 50, "train.collective_timeout_s": TIMEOUT_S})
    procs = start_ranks(config, log_dir=tmp_path, name="hang")
    code, waited = signal_rank_after_step(procs, log_path=tmp_path / "run" / "train_log.jsonl", step=1,
                                          sig=signal.SIGSTOP, wait_s=TIMEOUT_S + 60)
    survivor_log = (tmp_path / "hang_rank0.log").read_text()
    assert code is not None, f"rank 0 still ran {TIMEOUT_S + 60} s after rank 1 hung:\n{survivor_log[-3000:]}"
    assert code != 0
    assert TIMEOUT_S - 1 <= waited < TIMEOUT_S + 60  # it waited for the timeout, and no longer
    assert "training stopped: a collective failed" in survivor_log, survivor_log[-3000:]
