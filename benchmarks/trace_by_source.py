"""Device time per Python source line, from a chrome trace of `memory_vs_pointsam.py --profile`.

    python benchmarks/trace_by_source.py benchmarks/results/h200_run4/profile_ckpt_off/profile_resam_dist.trace.json.gz

Each GPU kernel (and memcpy/memset) is traced back to its launching runtime call, the operators
and Python frames enclosing that call on the host thread, and, for backward kernels (launched by
the autograd thread, which has no Python frames), to the forward operator with the same sequence
number. Times are summed per (fwd/bwd, innermost project frames) and per operator, and divided by
the number of profiled steps (2).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json

PROJECT_FRAMES = ("resam_dist/", "segment_anything/", "resam_kernels", "kernels/", "deepspeed/", "memory_vs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="*.trace.json.gz written by --profile")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps in the trace (default 2)")
    parser.add_argument("--rows", type=int, default=40, help="rows per table (default 40)")
    args = parser.parse_args(argv)

    events = json.load(gzip.open(args.trace))["traceEvents"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host = collections.defaultdict(list)  # thread -> operators and Python frames, by start time
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function") and e.get("ph") == "X":
            host[e["tid"]].append(e)
    for spans in host.values():
        spans.sort(key=lambda e: e["ts"])
    starts = {tid: [e["ts"] for e in spans] for tid, spans in host.items()}
    forward_op = {}  # autograd sequence number -> forward operator
    for e in events:
        if (e.get("cat") == "cpu_op" and "Sequence number" in e.get("args", {})
                and "Backward" not in e["name"] and not e["name"].startswith("autograd::")):
            forward_op.setdefault(e["args"]["Sequence number"], e)

    def enclosing(tid: int, ts: float) -> list[dict]:
        spans = host.get(tid, [])
        end = bisect.bisect_right(starts.get(tid, []), ts)
        return [e for e in spans[max(0, end - 4000):end] if e["ts"] <= ts <= e["ts"] + e["dur"]]

    def frames(stack: list[dict]) -> list[str]:
        return [e["name"] for e in stack
                if e.get("cat") == "python_function" and any(k in e["name"] for k in PROJECT_FRAMES)]

    by_line: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    total = 0.0
    for kernel in (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")):
        total += kernel["dur"]
        launch = launches.get(kernel["args"].get("correlation"))
        if launch is None:
            by_line[("?", kernel["name"][:60])] += kernel["dur"]
            continue
        stack = enclosing(launch["tid"], launch["ts"])
        operators = [e for e in stack if e.get("cat") == "cpu_op"]
        python = frames(stack)
        phase = "fwd"
        if not python:  # the autograd thread: use the forward operator's frames
            numbered = next((o for o in operators if "Sequence number" in o.get("args", {})), None)
            if numbered is not None and numbered["args"]["Sequence number"] in forward_op:
                source = forward_op[numbered["args"]["Sequence number"]]
                python, phase = frames(enclosing(source["tid"], source["ts"] + 1e-3)), "bwd"
        where = " < ".join(f.split("/")[-1] for f in python[-3:][::-1]) if python else "?"
        by_line[(phase, where)] += kernel["dur"]
        by_op[(phase, operators[-1]["name"] if operators else "-", where)] += kernel["dur"]

    per_step = 1e3 * args.steps  # microseconds -> ms per step
    print(f"device time {total / per_step:.1f} ms per step\n\nby source line (innermost project frames first)")
    for (phase, where), duration in by_line.most_common(args.rows):
        print(f"{duration / per_step:8.2f} ms  {phase}  {where}")
    print("\nby operator and source line")
    for (phase, op, where), duration in by_op.most_common(args.rows):
        print(f"{duration / per_step:8.2f} ms  {phase}  {op:34s} {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
