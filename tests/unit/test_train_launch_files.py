"""Launch files without a cluster: the sbatch scripts run against stub scontrol/srun/deepspeed/
torchrun executables; the Grafana dashboard only uses metrics the trainer exports."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resam_dist.train.metrics import CUDA_MEMORY, TrainMetrics

REPO = Path(__file__).resolve().parents[2]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run_sbatch(script: str, tmp_path: Path, *args: str, **env_overrides: str
                ) -> tuple[subprocess.CompletedProcess, Path]:
    stubs, venv = tmp_path / "stubs", tmp_path / "venv"
    stubs.mkdir()
    venv.mkdir()
    record = tmp_path / "calls.txt"
    _stub(stubs / "scontrol", '[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n')
    for name, folder in (("srun", stubs), ("deepspeed", venv), ("torchrun", venv)):
        line = f"{name} MASTER_ADDR=${{MASTER_ADDR:-}} MASTER_PORT=${{MASTER_PORT:-}} $*"
        _stub(folder / name, f'echo "{line}" >> {record}\n')
    # SLURM_NNODES 1 against two listed hosts: the node count comes from the host list
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "REPO_DIR": str(REPO), "VENV_BIN": str(venv),
           "GPUS_PER_NODE": "4", "HOSTFILE": str(tmp_path / "hostfile"), "CONFIG": "configs/whu.json",
           "EXTRA_ARGS": "--set train.max_steps=7", **env_overrides}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), *args], env=env, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    return result, record


def test_deepspeed_sbatch_writes_the_hostfile_and_points_at_the_first_host(tmp_path):
    result, record = _run_sbatch("train.sbatch", tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hostfile").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    call = record.read_text().strip()
    assert call.startswith("deepspeed MASTER_ADDR=gpu-a MASTER_PORT=29500 ")
    assert f"--hostfile {tmp_path / 'hostfile'}" in call and "--master_addr gpu-a" in call
    assert call.endswith("launch/train.py --config configs/whu.json --set train.max_steps=7")


def test_deepspeed_sbatch_with_the_slurm_launcher_needs_no_ssh_and_sizes_srun_itself(tmp_path):
    """DS_LAUNCHER=slurm through the real DeepSpeed runner: no ssh (a stub ssh that always fails),
    and srun gets every rank with the tasks and cores a node explicitly, not the batch script's
    --ntasks-per-node=1 / --cpus-per-task=32 that its SLURM_* variables carry."""
    stubs, record = tmp_path / "stubs", tmp_path / "srun.txt"
    stubs.mkdir()
    _stub(stubs / "scontrol", '[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"\n')
    _stub(stubs / "sinfo", "exit 0\n")
    _stub(stubs / "ssh", f'echo "ssh $*" >> {tmp_path / "ssh.txt"}; exit 255\n')
    _stub(stubs / "srun", f'printf "%s\\n" "$@" > {record}\n')
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_ID": "4243", "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "32",
           "SLURM_CPUS_ON_NODE": "64", "REPO_DIR": str(REPO), "VENV_BIN": str(Path(sys.executable).parent),
           "GPUS_PER_NODE": "4", "HOSTFILE": str(tmp_path / "hostfile"), "CONFIG": "configs/whu.json",
           "DS_LAUNCHER": "slurm", "EXTRA_ARGS": "--set train.max_steps=7"}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch")], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (tmp_path / "ssh.txt").exists()
    srun = record.read_text().splitlines()
    assert srun[:2] == ["-n", "8"]
    assert "--ntasks-per-node=4" in srun and "--cpus-per-task=16" in srun and "--kill-on-bad-exit=1" in srun
    assert srun[-5:] == ["launch/train.py", "--config", "configs/whu.json", "--set", "train.max_steps=7"]
    bad = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch")],
                         env={**env, "DS_LAUNCHER": "mpi"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "DS_LAUNCHER must be pdsh or slurm, got 'mpi'" in bad.stderr
    record.unlink()
    fractional = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "train.sbatch")],
                                env={**env, "CPUS_PER_RANK": "7.5"}, capture_output=True, text=True, timeout=60)
    assert fractional.returncode == 1
    assert "CPUS_PER_RANK must be a whole number, got '7.5'" in fractional.stderr
    assert not record.exists()  # refused before srun


def test_torchrun_sbatch_starts_one_agent_per_node_with_c10d_rendezvous(tmp_path):
    result, record = _run_sbatch("train_torchrun.sbatch", tmp_path, SLURM_CPUS_PER_TASK="32")
    assert result.returncode == 0, result.stderr
    call = record.read_text().strip()
    # the agent gets the allocation's cores explicitly (srun 22.05+ does not inherit them)
    assert call.startswith("srun ") and "--ntasks=2 --ntasks-per-node=1 --cpus-per-task=32" in call, call
    assert re.search(r"/torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu-a:29500 "
                     r"--rdzv-id 4242 launch/train.py --config configs/whu.json --set train.max_steps=7$", call), call


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((REPO / "launch" / "grafana" / "resam_dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bresam_[a-z_]+", expr)}
    metrics = TrainMetrics(rank=0, local_rank=0, base_port=0, enabled=False, device=torch.device("cpu"))
    exported = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    exported |= {f"resam_device_memory_{key}_bytes" for key in CUDA_MEMORY}
    assert used and used <= exported, sorted(used - exported)
    assert {"resam_samples_total", "resam_step_duration_seconds_bucket", "resam_loss"} <= used
    # every rank counts each skipped step (the guard's verdict is shared): panels take the largest
    # count over ranks, not the sum (which would read 4 skips for one step on 4 ranks)
    skipped = [expr for expr in exprs if "resam_skipped_steps_total" in expr]
    assert skipped and all(expr.startswith("max by (reason) (") for expr in skipped), skipped


def test_error_messages_name_the_srun_task_before_the_trainer_sets_rank(monkeypatch):
    """launch/train.py labels its error lines with RANK, or before the trainer has set it from
    srun's SLURM_PROCID (a config error under `srun python launch/train.py`), with that."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert entry.rank_label() == "0"
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert entry.rank_label() == "3"
    monkeypatch.setenv("RANK", "5")
    assert entry.rank_label() == "5"


def test_a_finished_rank_skips_the_interpreter_teardown_unless_a_monitor_needs_it(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "launch" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    monkeypatch.setattr(sys, "gettrace", lambda: None)  # (the same under a debugger or coverage)
    monkeypatch.setattr(sys, "getprofile", lambda: None)
    monkeypatch.delitem(sys.modules, "coverage", raising=False)
    assert not entry.finishes_at_exit({"zero_optimization": {"stage": 2}})
    assert not entry.finishes_at_exit({"wandb": {"enabled": False}, "tensorboard": {}})
    assert entry.finishes_at_exit({"wandb": {"enabled": True, "project": "resam"}})
    assert entry.finishes_at_exit({"csv_monitor": {"enabled": True, "output_path": "x"}})
    monkeypatch.setattr(sys, "getprofile", lambda: print)  # a profiler's output is written at exit
    assert entry.finishes_at_exit({})


@pytest.mark.parametrize("script", ["train.sbatch", "train_torchrun.sbatch"])
def test_extra_args_are_words_and_script_arguments_are_passed_on(tmp_path, script):
    """EXTRA_ARGS is split at whitespace without glob expansion ('config*' would match the checkout's
    configs/ folder), and the arguments after the script name follow it."""
    assert (REPO / "configs").is_dir()
    result, record = _run_sbatch(script, tmp_path, "--set", "train.seed=3",
                                 EXTRA_ARGS="--set data.train_shards=config*")
    assert result.returncode == 0, result.stderr
    assert record.read_text().strip().endswith(
        "launch/train.py --config configs/whu.json --set data.train_shards=config* --set train.seed=3")


@pytest.mark.parametrize("script", ["train.sbatch", "train_torchrun.sbatch"])
def test_extra_args_on_several_lines_are_all_passed_on(tmp_path, script):
    result, record = _run_sbatch(script, tmp_path, EXTRA_ARGS="--set train.max_steps=7\n--set train.seed=3")
    assert result.returncode == 0, result.stderr
    assert record.read_text().strip().endswith(
        "launch/train.py --config configs/whu.json --set train.max_steps=7 --set train.seed=3")


@pytest.mark.parametrize("script", ["train.sbatch", "train_torchrun.sbatch"])
@pytest.mark.parametrize("gpus", ["0", "4x", "-2"])
def test_a_bad_gpus_per_node_is_refused_before_anything_launches(tmp_path, script, gpus):
    # (train.sbatch's slurm launcher divides the node's cores by it: 0 was a swallowed bash error)
    result, record = _run_sbatch(script, tmp_path, GPUS_PER_NODE=gpus, SLURM_GPUS_ON_NODE=gpus,
                                 DS_LAUNCHER="slurm", SLURM_CPUS_ON_NODE="64")
    assert result.returncode == 1
    assert f"GPUS_PER_NODE must be a positive whole number, got '{gpus}'" in result.stderr
    assert not record.exists()

def _run_gpu_checks(tmp_path: Path, py_body: str, **variables: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu_checks.sh with a stub nvidia-smi and a stub python (`py_body`), `variables` in
    its environment; no DALI parts unless `variables` names DALI_PARTS (the checkout's own .dali/
    is never read)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    _stub(stubs / "nvidia-smi", "exit 0\n")
    _stub(stubs / "py", py_body)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PY": str(stubs / "py"),
           "OUT": str(tmp_path / "out"), "DALI_PARTS": str(tmp_path / "no_dali"), **variables}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("benchmark_rc, expected_rc", [(0, 0), (3, 1)])
def test_gpu_checks_runs_every_step_and_fails_when_one_did(tmp_path, benchmark_rc, expected_rc):
    """benchmarks/gpu_checks.sh against a stub nvidia-smi and a stub python whose benchmark scripts
    exit `benchmark_rc`: both steps run either way, and the script's status says whether one failed."""
    result = _run_gpu_checks(tmp_path, f'case "${{1:-}}" in benchmarks/*) exit {benchmark_rc};; esac\nexit 0\n',
                             CHECKS="kernels overlap_configs")
    assert result.returncode == expected_rc, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"=== [kernel benchmark] exit {benchmark_rc}" in result.stdout
    assert f"=== [word-kernel configs of overlap suppression] exit {benchmark_rc}" in result.stdout
    assert ("=== failed: kernel benchmark (exit 3)" in result.stdout) == (benchmark_rc != 0)


@pytest.mark.parametrize("carried", ["every part", "a part missing"])
def test_gpu_checks_installs_dali_from_its_parts_only_when_they_join_to_the_split_tar(tmp_path, carried):
    """DALI travels in parts over several calls (benchmarks/dali_parts.sh's layout: part-NN of a tar
    of wheels/, and dali.sha256 of that tar). gpu_checks.sh joins, unpacks and installs them into
    /tmp/site when they match the sha256, and says so when a part is missing."""
    import hashlib
    import tarfile
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("nvidia_dali_cuda130-2.4.0-py3-none-any.whl", "makefun-1.16.0-py2.py3-none-any.whl"):
        (wheels / name).write_bytes(os.urandom(3000))
    with tarfile.open(tmp_path / "dali.tar", "w") as tar:
        tar.add(wheels, arcname="wheels")
    data = (tmp_path / "dali.tar").read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "dali.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  dali.tar\n")
    chunk = len(data) // 3 + 1
    for index in range(3):
        if carried == "a part missing" and index == 1:
            continue
        (parts / f"part-{index:02d}").write_bytes(data[index * chunk:(index + 1) * chunk])
    calls = tmp_path / "py_calls.txt"
    result = _run_gpu_checks(tmp_path, f'echo "$@" >>{calls}\nexit 0\n', CHECKS="kernels", DALI_PARTS=str(parts),
                             DALI_UNPACK=str(tmp_path / "unpack"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    installs = [line for line in calls.read_text().splitlines() if str(tmp_path / "unpack") in line]
    if carried == "every part":
        assert "DALI installed from" in result.stdout
        assert len(installs) == 1 and "--target /tmp/site" in installs[0]
        assert "nvidia_dali_cuda130-2.4.0" in installs[0] and "makefun-1.16.0" in installs[0]
        assert (tmp_path / "unpack" / "wheels" / "makefun-1.16.0-py2.py3-none-any.whl").read_bytes() == (
            wheels / "makefun-1.16.0-py2.py3-none-any.whl").read_bytes()
    else:
        assert "DALI not installed: the parts in" in result.stdout and "(2 of them)" in result.stdout
        assert installs == []

def test_gpu_checks_refuses_checks_over_the_call_budget_before_running_anything(tmp_path):
    """MAX_CALL_S: the named checks' step limits must fit in one call (a lent machine kills a
    command at 600 s, losing the summary); "kernels ckpt" fits 570 s, "memory tests" does not."""
    for checks, expected_rc in (("memory tests", 2), ("kernels ckpt", 0)):
        result = _run_gpu_checks(tmp_path, "exit 0\n", CHECKS=checks, MAX_CALL_S="570")
        assert result.returncode == expected_rc, result.stdout[-2000:] + result.stderr[-2000:]
        refused = f'error: CHECKS="{checks}" may take up to 600s' in result.stdout
        assert refused == (expected_rc == 2) and ("=== [" in result.stdout) == (expected_rc == 0)


@pytest.mark.parametrize("variables, message", [
    ({"CHECKS": "kernel tests"}, "error: unknown check 'kernel' in CHECKS"),
    ({"CHECKS": "tests", "MAX_CALL_S": "570s"}, "error: MAX_CALL_S must be a whole number of seconds, got '570s'"),
    ({"CHECKS": "profile", "PROFILE_MODES": "encoder off"}, "error: PROFILE_MODES takes on and off, got 'encoder'"),
])
def test_gpu_checks_refuses_a_mistyped_setting_before_running_anything(tmp_path, variables, message):
    """A typo would otherwise run nothing (or the wrong thing, or lift the call budget) and exit 0:
    on a lent machine, a wasted call that looks like a success."""
    result = _run_gpu_checks(tmp_path, f'echo "$@" >> {tmp_path / "py_calls.txt"}\nexit 0\n', **variables)
    assert result.returncode == 2 and message in result.stdout, result.stdout[-2000:]
    assert "=== environment" not in result.stdout and not (tmp_path / "py_calls.txt").exists()
