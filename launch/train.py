"""Train ReSAM on any number of ranks: parse -> build -> train -> close.

    deepspeed --num_gpus 8 launch/train.py --config configs/nwpu.json
    torchrun --nproc-per-node 8 launch/train.py --config configs/nwpu.json --set train.max_steps=100

`--set key=value` overrides a dotted config key (the value is read as JSON, else as a string).
A rank that fails ends the job with a message and a non-zero exit status, never a silent hang.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import traceback


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """--set KEY=VALUE pairs -> {key: value} in the order they apply (a value that is not JSON is a
    string); a key given again moves to the end, so the last --set of a key wins."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")

        def refuse_duplicates(items: list[tuple[str, object]], key: str = key) -> dict[str, object]:
            """One JSON object's keys, refusing a repeated one (json.loads would keep the last)."""
            seen: dict[str, object] = {}
            for name, value in items:
                if name in seen:
                    raise ValueError(f"--set {key}: key '{name}' appears twice in one object (the first would be "
                                     "ignored)")
                seen[name] = value
            return seen

        overrides.pop(key, None)
        try:
            overrides[key] = json.loads(text, object_pairs_hook=refuse_duplicates)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def rank_label() -> str:
    """This process's global rank for messages: RANK (set by the launchers, or from SLURM_PROCID
    once the trainer has started), else srun's task index, else 0."""
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID", "0")


# DeepSpeed's monitors; wandb and comet finish their runs in exit handlers
MONITORS = ("wandb", "comet", "tensorboard", "csv_monitor")


def finishes_at_exit(deepspeed_block: dict) -> bool:
    """Whether something must run when the interpreter exits: a monitor of the "deepspeed" block, or
    a profiler, tracer or coverage measurement of this process (a successful rank otherwise ends
    without the interpreter's teardown)."""
    monitors = any(isinstance(deepspeed_block.get(name), dict) and deepspeed_block[name].get("enabled", False)
                   for name in MONITORS)
    return monitors or sys.getprofile() is not None or sys.gettrace() is not None or "coverage" in sys.modules


def end_process(status: int) -> None:
    """Ends the process at once with `status`, after flushing Python's and the C library's buffered
    output (DALI and NCCL write to the C streams). A stream that cannot be flushed (closed, or
    None when its file descriptor was closed at start) does not change the status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except (AttributeError, OSError, TypeError):
        pass
    os._exit(status)


def main(argv: list[str] | None = None, *, fast_exit: bool = False) -> int:
    """Runs one rank; returns 0 when it finished. `fast_exit` (the script): a finished rank ends
    the process without the interpreter's teardown unless `finishes_at_exit`. A failed rank always
    ends the process, status 2 for a user error and 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="passed by the deepspeed launcher (LOCAL_RANK in the environment wins)")
    args = parser.parse_args(argv)

    from resam_dist.config import load_config
    from resam_dist.train.engine import Trainer

    cfg = None
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        trainer = Trainer(cfg, local_rank_arg=args.local_rank)
        trainer.train()
        trainer.close()
    except ValueError as error:  # a user error (config, data, checkpoint) or a failed internal check
        traceback.print_exc()
        rank = rank_label()
        print(f"[rank {rank}] error: {error}", file=sys.stderr, flush=True)
        end_process(2)  # the other ranks, if any, stop at their collective timeout
    except Exception as error:  # noqa: BLE001 - every other failure ends this rank loudly
        traceback.print_exc()
        rank = rank_label()
        from torch.distributed import DistError
        if isinstance(error, DistError) or "gloo" in str(error).lower() or "nccl" in str(error).lower():
            timeout = f"{cfg.train.collective_timeout_s} s" if cfg is not None else "train.collective_timeout_s"
            print(f"[rank {rank}] training stopped: a collective failed, another rank has probably died or hung "
                  f"(collective timeout {timeout}). Cause: {error}", file=sys.stderr, flush=True)
        else:
            print(f"[rank {rank}] training stopped: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        end_process(1)  # no clean-up: a broken process group can hang at exit
    if fast_exit and not finishes_at_exit(cfg.deepspeed):
        # logs, metrics and the process group are closed, checkpoints and exports written: skip the
        # interpreter's teardown of torch, DeepSpeed and DALI (about 2 s a rank on 2 CPU cores)
        end_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(fast_exit=True))
