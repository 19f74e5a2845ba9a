"""The kernel benchmark script: `--cpu-smoke` writes its JSON/markdown; without CUDA it refuses."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def run_smoke(tmp_path, *only):
    """bench_kernels.py --cpu-smoke [--only CASE ...] into tmp_path -> its kernels.json."""
    selection = [arg for case in only for arg in ("--only", case)]
    completed = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", *selection, "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return json.loads((tmp_path / "kernels.json").read_text())


@pytest.fixture(scope="module")
def full_smoke(tmp_path_factory):
    """One `--cpu-smoke` run of every case (about 25 s on 2 cores), shared by the tests below."""
    out = tmp_path_factory.mktemp("smoke")
    return out, run_smoke(out)


def rows_of(result, kernel_prefix):
    return [row for row in result["rows"] if row["kernel"].split("/")[0] == kernel_prefix]


def test_cpu_smoke_writes_results(full_smoke):
    out, result = full_smoke
    assert result["smoke"] is True and "cpu" in result["device"]
    assert result["copy_bandwidth_gbps"] > 0
    kernels = {row["kernel"].split("/")[0] for row in result["rows"]}
    assert kernels == {"entropy_filter", "suppress_overlap", "ssa_loss_fwd_bwd", "mask_loss_fwd_bwd",
                       "relpos_attention_fwd_bwd", "layer_norm_fwd_bwd", "mask_head_fwd", "mask_head_fwd_bwd",
                       "instance_counts", "upsample4x_fwd_bwd", "mask_loss_upsampled_fwd_bwd"}
    timed = [row for row in result["rows"] if row["impl"] in ("triton", "torch_eager")]
    assert timed and all(row["ms"] > 0 and row["gbps"] > 0 for row in timed)
    markdown = (out / "kernels.md").read_text()
    assert "| suppress_overlap/argmax |" in markdown and result["device"] in markdown


def test_cpu_smoke_only_one_case(tmp_path):
    result = run_smoke(tmp_path, "mask_loss")
    assert {row["kernel"] for row in result["rows"]} == {"mask_loss_fwd_bwd/float32", "mask_loss_fwd_bwd/bfloat16"}
    assert {row["impl"] for row in result["rows"]} == {"torch_eager", "triton", "torch_compile"}


def test_cpu_smoke_mask_loss_upsampled(full_smoke):
    rows = rows_of(full_smoke[1], "mask_loss_upsampled_fwd_bwd")
    assert {row["kernel"] for row in rows} == {"mask_loss_upsampled_fwd_bwd/float32"}
    assert {row["shape"] for row in rows} == {"3x4x4->16x16"}
    assert {row["impl"] for row in rows} == {"torch_eager", "triton", "triton_unfused", "torch_compile"}
    assert all(row["ms"] > 0 and row["bytes"] == 3 * 16 * (4 + 16 + 4) for row in rows
               if row["impl"] != "torch_compile")


def test_cpu_smoke_layer_norm(full_smoke):
    rows = rows_of(full_smoke[1], "layer_norm_fwd_bwd")
    assert {row["kernel"] for row in rows} == {"layer_norm_fwd_bwd/bfloat16"}
    sites = ("upscale:300x64+bias+gelu", "norm4:50x256+res")
    assert {row["shape"] for row in rows} == {site + kind for site in sites for kind in ("+frozen", "+trainable")}
    assert {row["impl"] for row in rows} == {"torch_eager", "triton", "torch_compile", "torch_eager_native"}
    assert all(row["ms"] > 0 for row in rows if row["impl"] != "torch_compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal only happens without CUDA")
def test_refuses_without_cuda(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "CUDA" in completed.stderr
    assert not (tmp_path / "kernels.json").exists()


def test_cpu_smoke_relpos_attention(full_smoke):
    rows = rows_of(full_smoke[1], "relpos_attention_fwd_bwd")
    assert {row["kernel"] for row in rows} == {"relpos_attention_fwd_bwd/bfloat16"}
    assert {row["impl"] for row in rows} == {"torch_eager", "triton", "sdpa_augmented", "torch_compile"}
    assert all(row["ms"] > 0 for row in rows if row["impl"] != "torch_compile")


OVERLAP_CONFIGS = SCRIPT.parent / "bench_overlap_configs.py"


def test_overlap_configs_cpu_smoke_checks_and_times_every_candidate(tmp_path):
    """bench_overlap_configs.py --cpu-smoke: every word config its pruner keeps and the extra one
    not among them are checked against the reference (the script stops on a mismatch) and timed,
    for both kinds of masks, next to a copy of the same bytes."""
    completed = subprocess.run([sys.executable, str(OVERLAP_CONFIGS), "--cpu-smoke", "--extra", "512,32,2,1",
                                "--extra", "1024,32,2,2", "--extra", "512,16,2,1,1", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "overlap_configs.json").read_text())
    assert result["smoke"] is True and "cpu" in result["device"]
    for kind in ("random", "compact"):
        rows = [row for row in result["rows"] if row["masks"] == kind]
        assert [row["origin"] for row in rows].count("copy") == 1
        # 1024,32,2,2 is one of the tuned configs: timed once, as tuned
        assert [row["config"] for row in rows if row["origin"] == "extra"] == [
            "{'TILE': 512, 'STRIP_ROWS': 32, 'PREFETCH': 2} warps=1",
            "{'TILE': 512, 'STRIP_ROWS': 16, 'PREFETCH': 2, 'STREAM': True} warps=1"]
        # 1 x 3 x 16 x 64 bool masks, 16 words a row: the 15 tuned configs but TILE 8192 with 4 warps
        # (its tiles would straddle rows)
        tuned = [row["config"] for row in rows if row["origin"] == "tuned"]
        assert len(tuned) == len(set(tuned)) == 14 and "{'TILE': 8192} warps=4" not in tuned
        assert all(row["alone_ms"] > 0 and row["back_to_back_ms"] is None for row in rows)
    assert "| 1x3x16x64 | compact |" in (tmp_path / "overlap_configs.md").read_text()


def load_overlap_configs():
    """benchmarks/bench_overlap_configs.py as a module (its folder on the path, for bench_kernels)."""
    import importlib.util
    sys.path.insert(0, str(OVERLAP_CONFIGS.parent))
    try:
        spec = importlib.util.spec_from_file_location("bench_overlap_configs", OVERLAP_CONFIGS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(OVERLAP_CONFIGS.parent))
    return module


def test_overlap_configs_refuses_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert load_overlap_configs().main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_overlap_configs_takes_a_software_pipelined_extra():
    # PREFETCH 0: the strip's row loop software-pipelined by Triton (tuned since H200 run 19)
    config = load_overlap_configs().strip_config("2048,32,0,4,1")
    assert config.kwargs == {"TILE": 2048, "STRIP_ROWS": 32, "PREFETCH": 0, "STREAM": True} and config.num_warps == 4


@pytest.mark.parametrize("extra, message", [("512,32", "TILE,STRIP_ROWS,PREFETCH,WARPS[,STREAM] (4 or 5 integers)"),
                                            ("512,32,2,1,1,0", "(4 or 5 integers)"), ("512,32,2,x", "(4 or 5 integers)"),
                                            ("500,32,2,1", "powers of two"), ("512,33,2,1", "STRIP_ROWS 1 to 32"),
                                            ("512,32,3,1", "PREFETCH 0, 1 or 2"), ("512,32,2,1,2", "STREAM 0 or 1")])
def test_overlap_configs_refuses_a_malformed_extra(extra, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_overlap_configs().strip_config(extra)


def test_overlap_bytes_count_only_the_planes_the_kernels_read():
    """counts [43, 50] of K = 50 at 1024 x 1024: 93 planes read (plus 4 confidence bytes a pixel in
    "argmax" mode), 100 planes written, 100 boxes of 16 bytes; padding planes are never read."""
    overlap_bytes = load_overlap_configs().overlap_bytes
    pixels = 1024 * 1024
    counts = torch.tensor([43, 50])
    assert overlap_bytes(counts, 50, pixels, 1) == 93 * pixels + 100 * pixels + 1600
    assert overlap_bytes(counts, 50, pixels, 5) == 5 * 93 * pixels + 100 * pixels + 1600
    assert overlap_bytes(torch.tensor([70, -1]), 50, pixels, 1) == 50 * pixels + 100 * pixels + 1600


def test_overlap_configs_argmax_mode_checks_and_times_every_byte_config(tmp_path):
    """--mode argmax: byte-kernel configs (under --cpu-smoke the first of each design: tile, rows,
    strip), checked against the reference with confidences and timed, into
    overlap_configs_argmax.json (the drop results are left alone); no --extra there."""
    from resam_kernels.overlap import _BYTE_CONFIGS

    firsts = {}
    for config in _BYTE_CONFIGS:
        firsts.setdefault((config.kwargs["ROWS"], config.kwargs.get("STRIP_ROWS", 0) > 0), str(config.kwargs))
    completed = subprocess.run([sys.executable, str(OVERLAP_CONFIGS), "--cpu-smoke", "--mode", "argmax",
                                "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "overlap_configs_argmax.json").read_text())
    assert result["mode"] == "argmax" and not (tmp_path / "overlap_configs.json").exists()
    for kind in ("random", "compact"):
        rows = [row for row in result["rows"] if row["masks"] == kind]
        assert [row["config"].split(" warps=")[0] for row in rows if row["origin"] == "tuned"] == list(firsts.values())
    assert "Byte-kernel configs of \"argmax\"" in (tmp_path / "overlap_configs_argmax.md").read_text()
    with pytest.raises(SystemExit):
        load_overlap_configs().parse_args(["--mode", "argmax", "--extra", "512,32,2,1"])


def test_the_prepared_overlap_experiment_builds_on_the_products_helpers():
    """benchmarks/experiments/overlap_finish_balance.py waits for a GPU; its own --cpu-smoke checks
    every variant against the reference (about 2.5 minutes here, so not run in the suite). Here: it
    still imports, and shares the product's helpers rather than copies of them."""
    import importlib.util

    from resam_kernels import overlap
    path = SCRIPT.parent / "experiments" / "overlap_finish_balance.py"
    spec = importlib.util.spec_from_file_location("overlap_finish_balance", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    for name in ("_finish_image_of", "_fold_strip_boxes", "_strip_boxes", "_word_strip_load", "_word_strip_store",
                 "_write_boxes"):
        assert getattr(experiment, name) is getattr(overlap, name), name
    assert callable(experiment.main) and experiment.RACE_LAUNCHES > 0
