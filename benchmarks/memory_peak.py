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


def _replay(events: list[dict[str, Any]], start_bytes: int, stop: int | None = None):
    """Yield (index, allocated bytes, live {address: (bytes, origin)}, bytes from before the
    replay still live) after each allocation or free among events[:stop]. `live` is the same
    dict throughout (updated in place)."""
    live: dict[int, tuple[int, str]] = {}  # address -> (bytes, origin)
    allocated = before = start_bytes
    for index, event in enumerate(events[:stop]):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = (event["size"], _origin(event.get("frames", [])))
            allocated += event["size"]
        elif action == "free_requested":
            size, origin = live.pop(event["addr"], (event["size"], None))
            if origin is None:  # allocated before the replay
                before -= size
            allocated -= size
        else:
            continue
        yield index, allocated, live, before


def peak_allocations(events: list[dict[str, Any]], start_bytes: int) -> dict[str, Any]:
    """Replay allocator events ('alloc', 'free_requested': where the allocator's allocated-bytes
    statistic moves; others ignored) from `start_bytes` allocated. Returns {peak_bytes, peak_index,
    live: {origin: bytes at the peak}, timeline: [(event index, allocated bytes, origin of that
    event)]}; allocations from before the replay that are freed during it are subtracted from the
    'before the step' share. Event sizes are the requested bytes (the allocator rounds blocks up:
    its own statistics can be a little higher)."""
    peak, peak_index = start_bytes, -1
    timeline: list[tuple[int, int, str]] = []
    stride = max(1, len(events) // TIMELINE_POINTS)
    for index, allocated, _, _ in _replay(events, start_bytes):
        if allocated > peak:
            peak, peak_index = allocated, index
        if index % stride == 0:
            timeline.append((index, allocated, _origin(events[index].get("frames", []), depth=1)))
    grouped: dict[str, int] = defaultdict(int)
    peak_before = start_bytes
    for index, _, live, before in _replay(events, start_bytes, stop=peak_index + 1):  # again, to the peak
        if index == peak_index:
            for size, origin in live.values():
                grouped[origin] += size
            peak_before = before
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


MAX_EVENTS = 2_000_000  # the history is a ring buffer: a step with more events loses its first ones


def write_peak_report(path: Path, train_step: Callable[[], float], synchronize: Callable[[], None]) -> None:
    """One step with the allocator history on; the report of its peak to `path`, with the
    allocator's own peak of that step beside the replayed one."""
    import torch

    synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_bytes = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=MAX_EVENTS)
    try:
        train_step()
        synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    allocator_peak = torch.cuda.max_memory_allocated()
    events = snapshot["device_traces"][torch.cuda.current_device()]
    result = peak_allocations(events, start_bytes)
    title = (f"{path.stem}: one training step, allocator history\n"
             f"allocator's peak of the step (max_memory_allocated, whole blocks): "
             f"{allocator_peak / (1 << 20):,.1f} MiB")
    if len(events) >= MAX_EVENTS:
        title += f"\nWARNING: {len(events)} events fill the history: its first events were dropped, the replay is wrong"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_report(result, title))
