"""Prometheus metrics served over real HTTP, the JSON-lines log, and the loss guard (one process)."""

import json
import math
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from resam_dist.train.engine import LossGuard
from resam_dist.train.metrics import JsonlLog, TrainMetrics, read_jsonl


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_endpoint_serves_named_series_with_base_units():
    metrics = TrainMetrics(rank=3, local_rank=0, base_port=0, enabled=True, device=torch.device("cpu"),
                           addr="127.0.0.1")
    try:
        assert metrics.port and metrics.port > 0
        metrics.observe_step(images=8, duration_s=0.5, data_wait_s=0.1, learning_rate=1e-3, queue_entries=17,
                             losses={"total": 2.5, "dice": 0.25, "ssa": 0.75})
        metrics.observe_step(images=8, duration_s=0.3, data_wait_s=0.1, learning_rate=1e-3, queue_entries=33,
                             losses={"total": 2.0, "dice": 0.2, "ssa": 0.7})
        metrics.observe_skip(reason="nonfinite", images=8, duration_s=0.2, data_wait_s=0.0)
        got = _scrape(metrics.port)
    finally:
        metrics.close()
    rank = (("rank", "3"),)
    assert got[("resam_samples_total", rank)] == 24
    assert got[("resam_steps_total", rank)] == 2
    assert got[("resam_skipped_steps_total", (("rank", "3"), ("reason", "nonfinite")))] == 1
    assert got[("resam_skipped_steps_total", (("rank", "3"), ("reason", "spike")))] == 0
    # optimizer steps only; the skipped micro-batch has its own series
    assert got[("resam_step_duration_seconds_count", rank)] == 2
    assert got[("resam_step_duration_seconds_sum", rank)] == pytest.approx(0.8)
    assert got[("resam_skipped_step_duration_seconds_count", rank)] == 1
    assert got[("resam_skipped_step_duration_seconds_sum", rank)] == pytest.approx(0.2)
    assert got[("resam_data_wait_seconds_count", rank)] == 3
    assert got[("resam_images_per_second", rank)] == pytest.approx(8 / 0.4)
    assert got[("resam_queue_entries", rank)] == 33
    assert got[("resam_loss", (("part", "dice"), ("rank", "3")))] == pytest.approx(0.2)
    assert got[("resam_loss", (("part", "total"), ("rank", "3")))] == pytest.approx(2.0)
    assert got[("resam_learning_rate", rank)] == pytest.approx(1e-3)
    assert got[("resam_process_resident_memory_bytes", rank)] > 10 * 2**20
    assert not any(name.startswith("resam_device_memory") for name, _ in got)  # CUDA only


def test_disabled_metrics_serve_nothing_and_bad_port_is_a_value_error():
    metrics = TrainMetrics(rank=0, local_rank=0, base_port=0, enabled=False, device=torch.device("cpu"))
    assert metrics.port is None
    metrics.observe_step(images=1, duration_s=0.1, data_wait_s=0.0, losses={}, learning_rate=0.1, queue_entries=0)
    metrics.close()
    with pytest.raises(ValueError, match="base_port"):
        TrainMetrics(rank=0, local_rank=0, base_port=70000, enabled=True, device=torch.device("cpu"))


def test_busy_port_names_the_config_key():
    first = TrainMetrics(rank=0, local_rank=0, base_port=0, enabled=True, device=torch.device("cpu"),
                         addr="127.0.0.1")
    try:
        with pytest.raises(ValueError, match="metrics.base_port"):
            TrainMetrics(rank=0, local_rank=0, base_port=first.port, enabled=True, device=torch.device("cpu"),
                         addr="127.0.0.1")
    finally:
        first.close()


def test_jsonl_log_appends_and_reader_ignores_a_torn_last_line_and_the_next_run_starts_afresh(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path)
    log.write({"event": "step", "step": 1, "loss": 0.5})
    log.close()
    log = JsonlLog(path)  # a resumed run appends
    log.write({"event": "step", "step": 2, "loss": float("nan"), "parts": {"dice": float("inf")}})
    log.close()
    # strict JSON (no bare NaN / Infinity tokens, which jq and other strict readers refuse)
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in the log"))
              for line in path.read_text().splitlines()]
    assert strict[1]["loss"] == "NaN" and strict[1]["parts"] == {"dice": "Infinity"}
    with open(path, "a") as handle:
        handle.write('{"event": "step", "st')  # a writer killed mid-line
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert math.isnan(records[1]["loss"]) and records[1]["parts"] == {"dice": math.inf} and "time" in records[0]
    log = JsonlLog(path)  # the run resumed after the kill: its first record starts a line of its own
    log.write({"event": "start", "step": 2})
    log.close()
    assert [(r["event"], r["step"]) for r in read_jsonl(path)] == [("step", 1), ("step", 2), ("start", 2)]


def test_loss_guard_skips_nonfinite_and_spiking_losses():
    guard = LossGuard(spike_factor=4.0, window=3, world_size=1)
    parts = {"dice": torch.tensor(0.5), "focal": torch.tensor(0.1)}
    verdict = guard.check(torch.tensor(float("nan")), parts)
    assert verdict.skip_reason == "nonfinite" and verdict.nonfinite_ranks == 1
    verdict = guard.check(torch.tensor(1.0), {"dice": torch.tensor(float("inf")), "focal": torch.tensor(0.1)})
    assert verdict.skip_reason == "nonfinite"
    for value in (1.0, 2.0):
        guard.accept(guard.check(torch.tensor(value), parts))
    # the window is not full yet: no spike rule
    assert guard.check(torch.tensor(100.0), parts).skip_reason is None
    guard.accept(guard.check(torch.tensor(3.0), parts))
    assert guard.check(torch.tensor(7.9), parts).skip_reason is None      # mean 2, factor 4
    spike = guard.check(torch.tensor(8.1), parts)
    assert spike.skip_reason == "spike" and spike.loss == pytest.approx(8.1)
    assert spike.parts == pytest.approx({"dice": 0.5, "focal": 0.1})

    # micro-batches without instances (a zero loss) stay out of the window: before, enough of them
    # filled it with zeros, and every real loss then read as a spike
    for _ in range(5):
        empty = guard.check(torch.tensor(0.0), parts, instances=0)
        assert empty.skip_reason is None and empty.instances == 0
        guard.accept(empty)
    assert list(guard.recent) == [1.0, 2.0, 3.0]
    assert guard.check(torch.tensor(7.9), parts, instances=3).skip_reason is None

    restored = LossGuard(spike_factor=4.0, window=3, world_size=1)
    restored.load_state_dict(guard.state_dict())
    assert list(restored.recent) == [1.0, 2.0, 3.0]
    assert restored.check(torch.tensor(8.1), parts).skip_reason == "spike"
