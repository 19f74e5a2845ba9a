"""resam-bench's dispatch: `all` without CUDA runs the memory benchmark on the tiny SAM (its
ViT-B default at 1024 px would not fit a CPU machine), and leaves the kernels (CUDA only) out."""

import torch

from resam_dist import bench


def test_all_without_cuda_runs_the_tiny_memory_benchmark(monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "_run", lambda name, args: ran.append((name, args)) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["all"]) == 0
    assert ran == [("loader", []), ("memory", bench.CPU_MEMORY_ARGS)]
    assert bench.CPU_MEMORY_ARGS[:2] == ["--model", "tiny"]


def test_all_with_cuda_runs_every_benchmark_with_its_defaults(monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "_run", lambda name, args: ran.append((name, args)) or (3 if name == "memory" else 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["all"]) == 3  # the worst exit code
    assert ran == [("loader", []), ("memory", []), ("kernels", [])]


def test_unknown_benchmark_prints_the_usage(capsys):
    assert bench.main(["nope"]) == 2
    assert "resam-bench kernels" in capsys.readouterr().out


def test_all_counts_a_benchmark_killed_by_a_signal_and_takes_no_arguments(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_run", lambda name, args: -9 if name == "loader" else 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["all"]) == 9  # the loader was SIGKILLed (the OOM killer)
    assert bench.main(["all", "--out", "somewhere"]) == 2
    assert "all takes no arguments, got --out somewhere" in capsys.readouterr().err
