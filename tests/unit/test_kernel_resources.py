"""Fixed launch configurations of the relative-position attention and the SSA loss fit sm_90.

Compiled ahead of time for sm_90 by Triton on this CPU machine (no GPU needed; Triton's bundled
ptxas), in a subprocess without TRITON_INTERPRET. Shared memory grows with the element size and
as the grid width shrinks, so both dtypes, both head-dim buckets and the widest (WP 64) and
narrowest (WP 1) key-block layouts are compiled. A float32 d 80 forward over 14 x 14 windows
once needed 233,984 bytes and failed on an H200 at launch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SM90_SHARED_MEMORY = 232_448  # bytes a block may use (opt-in maximum on H100 / H200)

CHECK = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import torch
import importlib
rp = importlib.import_module("kernels.relpos_attention")  # the package exports a function of that name

target = GPUTarget("cuda", 90, 32)
kernels = {"forward": rp._forward_kernel, "backward_query": rp._backward_query_kernel,
           "backward_key": rp._backward_key_kernel}
jobs = [(dtype, type_name, head_dim, wp, name, kernel)
        for dtype, type_name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
        for head_dim in (64, 80) for wp in (1, 64) for name, kernel in kernels.items()]
results = []
for dtype, type_name, head_dim, wp, name, kernel in jobs[SHARD::SHARDS]:
    block_m, block_n, warps, stages = rp._gpu_config(name, head_dim, dtype)
    head_pad, _, _ = rp._geometry(head_dim, 64, block_n)
    constants = dict(HEAD_DIM=head_pad, BLOCK_M=block_m, BLOCK_N=block_n, WP=wp, R=block_n // wp,
                     PRECISION=rp._precision(dtype), UPCAST=False)
    signature = {}
    for arg in kernel.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in ("lse_ptr", "delta_ptr"):
            signature[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + type_name
        elif arg.startswith("scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
    results.append([type_name, head_dim, wp, name, compiled.metadata.shared])
print(json.dumps(results))
"""


# Each script compiles its jobs[SHARD::SHARDS]; the shards run side by side, one per core (two at most).
SHARDS = max(1, min(2, os.cpu_count() or 1))
SHARD_PREAMBLE = "import os\nSHARD, SHARDS = int(os.environ['SHARD']), int(os.environ['SHARDS'])\n"


def compile_for_sm90(script: str) -> list:
    """Runs a compile script in SHARDS subprocesses at once, without TRITON_INTERPRET (the
    repository on their path); returns the JSON lists they print last, joined."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    shards = [subprocess.Popen([sys.executable, "-c", SHARD_PREAMBLE + script], cwd=ROOT,
                               env=dict(env, SHARD=str(shard), SHARDS=str(SHARDS)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for shard in range(SHARDS)]
    results = []
    for shard in shards:
        stdout, stderr = shard.communicate(timeout=600)
        assert shard.returncode == 0, stderr[-3000:]
        results += json.loads(stdout.strip().splitlines()[-1])
    return results


def test_relpos_attention_configs_fit_sm90_shared_memory():
    results = compile_for_sm90(CHECK)
    assert len(results) == 24
    over = [row for row in results if row[-1] > SM90_SHARED_MEMORY]
    assert not over, f"configurations over sm_90's {SM90_SHARED_MEMORY} bytes of shared memory: {over}"
    assert all(row[-1] > 0 for row in results)  # the compiler reported a size for each


SSA_CHECK = r"""
import json, os, re, subprocess, tempfile
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import ssa

kernel = ssa._ssa_queue_partial_kernel
ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
folder = tempfile.mkdtemp()
results = []
for config in [config for config in ssa._PARTIAL_CONFIGS_F32 if config.kwargs["SPLIT_BF16"]][SHARD::SHARDS]:
    constants = dict(config.kwargs, BLOCK_C=256, BF16_DOT=False, UPCAST_BF16_DOT=False)
    signature = {}
    for arg in kernel.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg == "scale_log2":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    # the runtime specialises pointers and multiples of 16 (dim = 256) as 16-divisible
    aligned = [arg for arg in kernel.arg_names if arg.endswith("_ptr") or arg in ("dim", "split_len")]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    path = os.path.join(folder, "kernel.ptx")
    with open(path, "w") as file:
        file.write(compiled.asm["ptx"])
    done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                          capture_output=True, text=True, check=True)
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill", done.stderr))
    results.append([str(config), compiled.metadata.shared, spill])
print(json.dumps(results))
"""


def test_ssa_split_bf16_configs_fit_sm90_without_spills():
    """The float32 SPLIT_BF16 tiles of the SSA partial kernel at C = 256: no register spill and
    shared memory within sm_90's limit (ptxas of Triton's bundle, on this CPU machine)."""
    results = compile_for_sm90(SSA_CHECK)
    assert len(results) == 7
    assert all(0 < shared <= SM90_SHARED_MEMORY for _, shared, _ in results), results
    assert not [row for row in results if row[2] > 0], f"configurations that spill: {results}"


OVERLAP_CHECK = r"""
import json, os, re, subprocess, tempfile
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import overlap

ptxas = os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
folder = tempfile.mkdtemp()


def spills(kernel, constants, num_warps, byte_pointers, aligned=()):
    signature = {}
    for arg in kernel.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg == "counts_ptr":
            signature[arg] = "*i64"
        elif arg in ("boxes_ptr", "confidence_ptr"):
            signature[arg] = "*fp32"
        elif arg.endswith("_ptr"):
            signature[arg] = "*u8" if byte_pointers and arg in ("masks_ptr", "out_ptr") else "*i32"
        else:
            signature[arg] = "i32"  # no divisibility hints: the worst case
    # aligned: the arguments the runtime specialises as multiples of 16 where the autotuner runs
    # the config only then
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
                       attrs={(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    path = os.path.join(folder, "kernel.ptx")
    with open(path, "w") as file:
        file.write(compiled.asm["ptx"])
    done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", path, "-o", path + ".cubin"],
                          capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill", done.stderr))


jobs = []  # (row of the result without its spill, kernel, constants, warps, byte pointers, aligned)
for config in overlap._BYTE_CONFIGS:
    if config.kwargs.get("STRIP_ROWS", 0):
        for argmax in (False, True):
            jobs.append((["strip", str(config), argmax], overlap._suppress_overlap_kernel,
                         dict(config.kwargs, KP=64, ARGMAX=argmax), config.num_warps, True, ()))
for config in overlap._WORD_CONFIGS:
    for zero_one in (False, True):
        for row_tiles in (False, True):
            words_per_row = 256 if row_tiles else 63
            if not overlap._prune_word_configs([config], {"words_per_row": words_per_row}, KP=64,
                                               ZERO_ONE=zero_one):
                continue  # the autotuner never runs it there
            constants = dict({"STRIP_ROWS": 0, "PREFETCH": 1}, **config.kwargs, KP=64, ZERO_ONE=zero_one,
                             ROW_TILES=row_tiles)
            # the strip design runs only on rows of a multiple of 16 words and 16-byte aligned buffers
            aligned = (("words_ptr", "out_ptr", "words_per_row", "num_words")
                       if "STRIP_ROWS" in config.kwargs else ())
            jobs.append((["words", str(config), [zero_one, row_tiles]], overlap._suppress_drop_words_jit,
                         constants, config.num_warps, False, aligned))
results = [row + [spills(kernel, constants, warps, byte_pointers, aligned)]
           for row, kernel, constants, warps, byte_pointers, aligned in jobs[SHARD::SHARDS]]
print(json.dumps(results))
"""


def test_overlap_strip_and_word_configs_fit_sm90_without_spills():
    """Overlap suppression: the strip design's configs (both modes) and the word kernel's configs
    in every (bool masks, one-row tiles) case the autotuner runs them in, at KP = 64 without
    divisibility hints (the word kernel's strip design with the hints it runs under only): no
    register spill (ptxas of Triton's bundle, on this CPU machine). TILE 8192 with 4 warps spills
    where it is pruned: on tiles that straddle rows (ptxas: 648-784 bytes of spill stores and
    loads); so does the strip design without hints (336-376 bytes)."""
    results = compile_for_sm90(OVERLAP_CHECK)
    # byte strip configs x modes + word tile configs x cases - pruned + word strip configs x 2 cases
    assert len(results) == 4 * 2 + (7 * 4 - 3) + 8 * 2
    assert not [row for row in results if row[-1] > 0], f"configurations that spill: {results}"
