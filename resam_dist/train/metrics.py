"""Training telemetry: Prometheus metrics per rank, the JSON-lines log and the console bar.

Prometheus (prometheus_client, own registry per process): every rank serves `/metrics` on
`base_port + local_rank` (base_port 0: a free port; the real port is reported to rank 0, which
writes it to the JSON-lines log). Names follow Prometheus conventions: `resam_` prefix, base
units, counters ending in `_total`, one bounded `rank` label (the global rank).

| metric                                   | type      | labels        |
|------------------------------------------|-----------|---------------|
| resam_samples_total                      | counter   | rank          |
| resam_steps_total                        | counter   | rank          |
| resam_skipped_steps_total                | counter   | rank, reason  |
| resam_step_duration_seconds              | histogram | rank          |
| resam_skipped_step_duration_seconds      | histogram | rank          |
| resam_data_wait_seconds                  | histogram | rank          |
| resam_images_per_second                  | gauge     | rank          |
| resam_queue_entries                      | gauge     | rank          |
| resam_loss                               | gauge     | rank, part    |
| resam_learning_rate                      | gauge     | rank          |
| resam_process_resident_memory_bytes      | gauge     | rank          |
| resam_device_memory_allocated_bytes      | gauge     | rank (CUDA)   |
| resam_device_memory_peak_bytes           | gauge     | rank (CUDA)   |
| resam_device_memory_reserved_bytes       | gauge     | rank (CUDA)   |
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# nonfinite / spike: micro-batches the loss guard skipped (no backward); nonfinite_grad: optimizer
# steps whose update DeepSpeed skipped for non-finite gradients (the step is still counted)
SKIP_REASONS = ("nonfinite", "spike", "nonfinite_grad")
LOSS_PARTS = ("total", "focal", "dice", "iou_mse", "ssa")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
CUDA_MEMORY = {"allocated": "Device memory held by tensors.",
               "peak": "Peak device memory held by tensors since the start.",
               "reserved": "Device memory reserved by the caching allocator."}
"""The CUDA-only gauges resam_device_memory_<key>_bytes."""


def resident_memory_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_stats(device: torch.device) -> dict[str, int]:
    """Memory in bytes: process RSS always; allocated/peak/reserved of `device` on CUDA."""
    stats = {"rss_bytes": resident_memory_bytes()}
    if device.type == "cuda":
        stats["allocated_bytes"] = torch.cuda.memory_allocated(device)
        stats["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        stats["reserved_bytes"] = torch.cuda.memory_reserved(device)
    return stats


class TrainMetrics:
    """Prometheus metrics of one rank (see the module docstring)."""

    def __init__(self, *, rank: int, local_rank: int, base_port: int, enabled: bool, device: torch.device,
                 addr: str = "0.0.0.0") -> None:
        if base_port < 0 or base_port > 65535:
            raise ValueError(f"metrics.base_port must be 0-65535, got {base_port}")
        self.device = device
        self.registry = CollectorRegistry()
        label = {"rank": str(rank)}
        registry = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, ["rank", *extra], registry=registry)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, ["rank", *extra], registry=registry)

        self.samples = counter("resam_samples", "Training images processed by this rank (skipped steps included).")
        self.steps = counter("resam_steps", "Optimizer steps counted, those whose update DeepSpeed skipped "
                             "included (they are also in resam_skipped_steps_total{reason=\"nonfinite_grad\"}).")
        self.skipped = counter("resam_skipped_steps", "Micro-steps the loss guard skipped (nonfinite, spike) and "
                               "optimizer updates DeepSpeed skipped (nonfinite_grad).", ("reason",))
        self.step_duration = Histogram("resam_step_duration_seconds", "Wall time of one optimizer step "
                                       "(data wait excluded).", ["rank"], buckets=STEP_BUCKETS, registry=registry)
        # a skipped micro-batch is not an optimizer step (which may take several micro-batches):
        # its own series, so the step histogram holds steps only
        self.skipped_step_duration = Histogram(
            "resam_skipped_step_duration_seconds", "Wall time of one micro-batch the loss guard skipped "
            "(data wait excluded).", ["rank"], buckets=STEP_BUCKETS, registry=registry)
        self.data_wait = Histogram("resam_data_wait_seconds", "Time spent waiting for the next batch.",
                                   ["rank"], buckets=WAIT_BUCKETS, registry=registry)
        self.images_per_second = gauge("resam_images_per_second", "Training images per second on this rank "
                                       "(last step, data wait included).")
        self.queue_entries = gauge("resam_queue_entries", "Entries in the SSA embedding queue.")
        self.loss = gauge("resam_loss", "Loss of the last step (mean over ranks), per part.", ("part",))
        self.learning_rate = gauge("resam_learning_rate", "Learning rate of the last optimizer step.")
        self.rss = gauge("resam_process_resident_memory_bytes", "Resident memory of this rank's process.")
        self.cuda_memory: dict[str, Gauge] = {}
        if device.type == "cuda":
            for key, doc in CUDA_MEMORY.items():
                self.cuda_memory[key] = gauge(f"resam_device_memory_{key}_bytes", doc)

        # children with their labels, so every series exists (at 0) from the first scrape
        self._samples = self.samples.labels(**label)
        self._steps = self.steps.labels(**label)
        self._skipped = {reason: self.skipped.labels(reason=reason, **label) for reason in SKIP_REASONS}
        self._step_duration = self.step_duration.labels(**label)
        self._skipped_step_duration = self.skipped_step_duration.labels(**label)
        self._data_wait = self.data_wait.labels(**label)
        self._images_per_second = self.images_per_second.labels(**label)
        self._queue_entries = self.queue_entries.labels(**label)
        self._loss = {part: self.loss.labels(part=part, **label) for part in LOSS_PARTS}
        self._label = label
        self._learning_rate = self.learning_rate.labels(**label)
        self._rss = self.rss.labels(**label)
        self._cuda = {key: g.labels(**label) for key, g in self.cuda_memory.items()}

        self.port: int | None = None
        self._server = None
        if enabled:
            port = 0 if base_port == 0 else base_port + local_rank
            try:
                self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as error:
                raise ValueError(f"metrics: cannot serve on port {port} (metrics.base_port {base_port} + local rank "
                                 f"{local_rank}): {error}; choose another metrics.base_port, or 0 for free ports") \
                    from error
            self.port = int(self._server.server_port)

    def observe_step(self, *, images: int, duration_s: float, data_wait_s: float, losses: dict[str, float],
                     learning_rate: float, queue_entries: int) -> dict[str, int]:
        """Record one optimizer step; returns the memory stats it read (bytes)."""
        self._samples.inc(images)
        self._steps.inc()
        self._step_duration.observe(duration_s)
        self._data_wait.observe(data_wait_s)
        total_s = duration_s + data_wait_s
        self._images_per_second.set(images / total_s if total_s > 0 else 0.0)
        for part, value in losses.items():
            child = self._loss.get(part)
            if child is None:
                child = self._loss[part] = self.loss.labels(part=part, **self._label)
            child.set(value)
        self._learning_rate.set(learning_rate)
        self._queue_entries.set(queue_entries)
        return self.observe_memory()

    def observe_skip(self, *, reason: str, images: int, duration_s: float, data_wait_s: float) -> None:
        """Record a step the loss guard skipped (its images were read, no optimizer step)."""
        if reason not in self._skipped:
            raise ValueError(f"unknown skip reason {reason!r} (known: {SKIP_REASONS})")
        self._skipped[reason].inc()
        self._samples.inc(images)
        self._skipped_step_duration.observe(duration_s)
        self._data_wait.observe(data_wait_s)

    def observe_skipped_update(self) -> None:
        """Record an optimizer update DeepSpeed skipped (`observe_step` records its micro-batches)."""
        self._skipped["nonfinite_grad"].inc()

    def observe_memory(self) -> dict[str, int]:
        stats = memory_stats(self.device)
        self._rss.set(stats["rss_bytes"])
        for key, child in self._cuda.items():
            child.set(stats[f"{key}_bytes"])
        return stats

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# Non-finite numbers in the JSON-lines log (a skipped step's NaN loss): strict JSON has none, so
# they are written as these strings (jq and other strict readers accept every line), and
# `read_jsonl` gives them back as floats.
NONFINITE_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _strict_json_value(value: Any) -> Any:
    """value with every non-finite float (in dicts and lists too) replaced by its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json_value(item) for item in value]
    return value


def _nonfinite_back(value: Any) -> Any:
    if isinstance(value, str):
        return NONFINITE_NAMES.get(value, value)
    if isinstance(value, dict):
        return {key: _nonfinite_back(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nonfinite_back(item) for item in value]
    return value


class JsonlLog:
    """Append-only JSON-lines log (rank 0): one object per line (strict JSON: non-finite numbers
    as the strings of NONFINITE_NAMES), flushed at once. A log whose last line was torn (a killed
    writer) gets a line break first, so the next record stays whole."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._handle = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.is_file() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    torn = existing.read(1) != b"\n"
            self._handle = open(self.path, "a", buffering=1)
            if torn:
                self._handle.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is not None:
            record = _strict_json_value({"time": round(time.time(), 3), **record})
            self._handle.write(json.dumps(record, allow_nan=False) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines log (a partial last line from a killed writer is ignored), with
    non-finite numbers as floats again."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(_nonfinite_back(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class ProgressBar:
    """Rank-0 tqdm bar: step, loss, images/s, memory. A no-op on other ranks."""

    def __init__(self, *, enabled: bool, total: int, initial: int) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=0.5, file=sys.stderr)

    def update(self, *, step: int, loss: float, images_per_second: float, memory_bytes: int) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix({"loss": f"{loss:.4f}", "img/s": f"{images_per_second:.1f}",
                               "mem": f"{memory_bytes / 2**30:.2f}GiB"}, refresh=False)
        self._bar.update(step - self._bar.n)  # redraws at most every `mininterval` seconds

    def finish(self, step: int) -> None:
        """The run ended at `step` (below the planned total when batches were skipped)."""
        if self._bar is not None:
            self._bar.total = step
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
