"""benchmarks/memory_peak.py: replaying allocator events to the peak and its live allocations."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from memory_peak import format_report, peak_allocations  # noqa: E402


def frames(*places):
    return [{"filename": filename, "line": line, "name": name} for filename, line, name in places]


def test_peak_and_live_allocations_by_origin():
    encoder = frames(("/x/torch/nn/functional.py", 10, "linear"), ("/repo/resam_dist/model/sam.py", 190, "encode"))
    loss = frames(("/repo/kernels/mask_loss.py", 50, "forward"), ("/repo/resam_dist/resam/step.py", 145, "step"))
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": encoder},
        {"action": "alloc", "addr": 2, "size": 50, "frames": encoder},
        {"action": "segment_alloc", "addr": 99, "size": 10_000, "frames": []},  # not an allocation
        {"action": "free_requested", "addr": 2, "size": 50, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 50, "frames": []},  # counted once, at the request
        {"action": "free_requested", "addr": 7, "size": 30, "frames": []},  # from before the replay
        {"action": "alloc", "addr": 3, "size": 200, "frames": loss},  # the peak: 1000 + 100 - 30 + 200
        {"action": "free_requested", "addr": 3, "size": 200, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": []},
    ]
    result = peak_allocations(events, start_bytes=1000)
    assert result["peak_bytes"] == 1270 and result["peak_index"] == 6
    live = result["live"]
    assert live["(before the step: weights, optimizer state, batch, ...)"] == 970
    assert live["mask_loss.py:50 forward <- step.py:145 step"] == 200
    assert live["functional.py:10 linear <- sam.py:190 encode"] == 100
    assert sum(live.values()) == result["peak_bytes"]
    assert result["timeline"][-1][1] == 970  # back to the start minus the freed earlier block
    report = format_report(result, "test")
    assert "peak 0.0 MiB at event 6 of 9" in report and "mask_loss.py:50" in report


def test_no_events_is_the_start():
    result = peak_allocations([], start_bytes=5)
    assert result["peak_bytes"] == 5 and result["peak_index"] == -1 and result["timeline"] == []
