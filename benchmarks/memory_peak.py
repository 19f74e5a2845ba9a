"""What is allocated at a training step's memory peak, and where it was allocated (CUDA only).

`memory_vs_pointsam.py --memory-trace DIR` runs one more step per variant with the CUDA caching
allocator's history on (`torch.cuda.memory._record_memory_history`) and writes
`DIR/memory_peak_<variant>.txt` through `write_peak_report`:

- the allocated bytes over the step (a coarse timeline with the code allocating at each point);
- the allocations live at the peak, grouped by the project source lines that made them.

Allocations that existed before the step (weights, optimizer state, the batch) have no recorded
origin: they are reported as one "before the step" line.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

PROJECT_PARTS = ("/resam_dist/", "/kernels/", "/resam_kernels/", "/benchmarks/")
TIMELINE_POINTS = 40


def _origin(frames: list[dict[str, Any]], depth: int = 3) -> str:
    """The first `depth` project frames of an allocation (innermost first), after the innermost
    frame of any file: 'op <- file:line fn <- ...'."""
    if not frames:
        return "(no stack: autograd engine or C++)"
    innermost = frames[0]
    parts = [f"{Path(innermost['filename']).name}:{innermost['line']} {innermost['name']}"]
    for frame in frames:
        if any(part in frame["filename"] for part in PROJECT_PARTS) and frame is not innermost:
            parts.append(f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}")
            if len(parts) > depth:
                break
    return " <- ".join(parts)


def peak_allocations(events: list[dict[str, Any]], start_bytes: int) -> dict[str, Any]:
    """Replay allocator events ('alloc', 'free_requested': where the allocator's allocated-bytes
    statistic moves; others ignored) from `start_bytes`
    allocated. Returns {peak_bytes, peak_index, live: {origin: bytes at the peak}, timeline:
    [(event index, allocated bytes, origin of that event)]}; allocations from before the replay
    that are freed during it are subtracted from the 'before the step' share."""
    live: dict[int, tuple[int, str]] = {}  # address -> (bytes, origin)
    allocated = before = start_bytes
    peak, peak_index, peak_live, peak_before = allocated, -1, {}, before
    timeline: list[tuple[int, int, str]] = []
    stride = max(1, len(events) // TIMELINE_POINTS)
    for index, event in enumerate(events):
        action = event.get("action")
        if action == "alloc":
            origin = _origin(event.get("frames", []))
            live[event["addr"]] = (event["size"], origin)
            allocated += event["size"]
        elif action == "free_requested":
            size, origin = live.pop(event["addr"], (event["size"], None))
            if origin is None:  # allocated before the replay
                before -= size
            allocated -= size
        else:
            continue
        if allocated > peak:
            peak, peak_index, peak_before = allocated, index, before
            peak_live = dict(live)
        if index % stride == 0:
            timeline.append((index, allocated, _origin(event.get("frames", []), depth=1)))
    grouped: dict[str, int] = defaultdict(int)
    for size, origin in peak_live.values():
        grouped[origin] += size
    grouped["(before the step: weights, optimizer state, batch, ...)"] = peak_before
    return {"peak_bytes": peak, "peak_index": peak_index, "events": len(events),
            "live": dict(sorted(grouped.items(), key=lambda item: -item[1])), "timeline": timeline}


def format_report(result: dict[str, Any], title: str, top: int = 45) -> str:
    mib = 1 << 20
    lines = [f"{title}", f"peak {result['peak_bytes'] / mib:,.1f} MiB at event {result['peak_index']} of "
             f"{result['events']}", "", "live at the peak, by origin (MiB):"]
    for origin, size in list(result["live"].items())[:top]:
        lines.append(f"{size / mib:10,.1f}  {origin}")
    lines += ["", "timeline (event, allocated MiB, allocating code):"]
    lines += [f"{index:8d} {size / mib:10,.1f}  {origin}" for index, size, origin in result["timeline"]]
    return "\n".join(lines) + "\n"


def write_peak_report(path: Path, train_step: Callable[[], float], synchronize: Callable[[], None]) -> None:
    """One step with the allocator history on; the report of its peak to `path`."""
    import torch

    synchronize()
    start_bytes = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=2_000_000)
    try:
        train_step()
        synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    result = peak_allocations(events, start_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_report(result, f"{path.stem}: one training step, allocator history"))
