"""Shared helpers of the multi-process training tests: data, configs, ports, launchers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from resam_dist.train.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "launch" / "train.py"
BIN = Path(sys.executable).parent


def make_shards(out_dir: Path) -> Path:
    """16 synthetic 256 px scenes with a few instances each -> WebDataset shards (real resam-prep)."""
    from resam_dist.data.shards import TileOptions, prepare_shards
    from resam_dist.data.synthetic import write_synthetic_coco

    annotations = write_synthetic_coco(out_dir / "coco", "source_shapes", 16, 256, seed=0)
    prepare_shards(annotations=annotations, images=out_dir / "coco" / "images", out_dir=out_dir / "shards",
                   options=TileOptions(tile_size=256, overlap=0), progress=False)
    return out_dir / "shards"


def write_config(path: Path, *, shards: Path, output_dir: Path, overrides: dict[str, Any] | None = None) -> Path:
    """configs/demo.json made small for tests (torch kernel references: Triton's CPU interpreter is
    far too slow for training steps), with dotted-key overrides."""
    raw = json.loads((REPO / "configs" / "demo.json").read_text())
    settings = {
        "data.train_shards": str(shards), "data.reader_threads": 1,
        "train.images_per_rank": 2, "train.max_steps": 4, "train.warmup_steps": 2, "train.milestones": [3],
        "train.output_dir": str(output_dir), "train.collective_timeout_s": 60, "train.log_every": 1,
        "kernels.enabled": False, "metrics.base_port": 0,
        "checkpoint.every_steps": 0, "checkpoint.keep_last": 2,
        **(overrides or {}),
    }
    for dotted, value in settings.items():
        node = raw
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(json.dumps(raw, indent=1))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free (base_port for 2 local ranks)."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports found")


def clean_env(*, cuda: bool = False, **extra: str) -> dict[str, str]:
    """The test's environment without launcher variables, one thread per rank (2-core machines),
    the repository first on the Python path (the caller's path after it). Without `cuda` the ranks
    see no GPU (gloo on CPU, as these tests mean, also on a machine with GPUs)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
                        "SLURM_STEP_NUM_TASKS")}
    path = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}, **extra)
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(cmd: list[str], *, log: Path, timeout: float = 300, cuda: bool = False) -> subprocess.CompletedProcess:
    """Run a launcher to completion in its own process group; output to `log` (`cuda`: see `clean_env`)."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(cuda=cuda), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout} s; log {log}:\n"
                                 f"{log.read_text()[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


def deepspeed_cmd(config: Path, *extra: str, nprocs: int = 2) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
            str(TRAIN_SCRIPT), "--config", str(config), *extra]


def torchrun_cmd(config: Path, *extra: str, nprocs: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(nprocs), "--master-port", str(free_port()),
            str(TRAIN_SCRIPT), "--config", str(config), *extra]


def start_ranks(config: Path, *, log_dir: Path, name: str, world_size: int = 2) -> list[subprocess.Popen]:
    """Start every rank as a plain process (no launcher that would end the others when one dies);
    rank r logs to log_dir/<name>_rank<r>.log."""
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        with open(log_dir / f"{name}_rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(config)], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def step_losses(log_path: Path) -> dict[int, float]:
    """Loss per optimizer step from a JSON-lines log (a resumed run's record wins over a killed one's)."""
    return {r["step"]: r["loss"] for r in read_jsonl(log_path) if r.get("event") == "step"}


def wait_for(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def signal_rank_after_step(procs: list[subprocess.Popen], *, log_path: Path, step: int, sig: int,
                           wait_s: float) -> tuple[int | None, float]:
    """Once rank 0 logged optimizer step `step`, send `sig` to rank 1 and wait up to `wait_s` for
    rank 0 to exit. Returns (rank 0's exit code or None if it still ran, seconds it took). Every
    process is ended afterwards (SIGKILL also ends a stopped one)."""
    try:
        wait_for(lambda: log_path.exists() and max(step_losses(log_path), default=0) >= step, timeout=240,
                 what=f"step {step} before signalling rank 1")
        os.kill(procs[1].pid, sig)
        signalled_at = time.monotonic()
        try:
            code = procs[0].wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - signalled_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
