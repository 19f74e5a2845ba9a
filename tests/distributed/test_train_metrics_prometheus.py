"""ZeRO-1 (bf16 on CPU) on 2 ranks under torchrun: every rank serves Prometheus metrics on
base_port + local_rank, scraped over real HTTP during the run, and a real Prometheus server
(Debian package `prometheus`) scrapes both ranks; the JSON-lines log holds every step."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resam_dist.train.metrics import read_jsonl
from train_helpers import REPO, clean_env, free_port, free_port_pair, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed

STEPS = 10
LOG_EVERY = 4  # steps 4, 8 and the last (10) are logged
PROMETHEUS = shutil.which("prometheus")


def _scrape(port: int) -> dict[tuple[str, tuple], float] | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _query(prometheus_port: int, expr: str) -> dict[str, float]:
    """Instant query -> {rank label: value}."""
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        reply = json.loads(urllib.request.urlopen(url, timeout=2).read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return {}
    return {r["metric"].get("rank", "?"): float(r["value"][1]) for r in reply.get("data", {}).get("result", [])}


def _query_status(prometheus_port: int, expr: str) -> str:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["status"]
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}: {error.read().decode(errors='replace')}"


@pytest.fixture(scope="module")
def observed(train_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("metrics")
    metrics_port = free_port_pair()
    config = write_config(base / "config.json", shards=train_shards, output_dir=base / "run", overrides={
        "deepspeed.zero_optimization.stage": 1, "train.precision": "bf16", "train.max_steps": STEPS,
        "train.log_every": LOG_EVERY, "metrics.base_port": metrics_port})

    prometheus, prometheus_port = None, None
    if PROMETHEUS:
        prometheus_port = free_port()
        (base / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: resam\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}', '127.0.0.1:{metrics_port + 1}']\n")
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=open(base / "prometheus.log", "w"), stderr=subprocess.STDOUT)

    scrapes: dict[int, dict] = {}
    dashboard_queries: dict[str, str] = {}
    rates: dict[str, float] = {}
    log = open(base / "train.log", "w")
    train = subprocess.Popen(torchrun_cmd(config), cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while train.poll() is None and time.monotonic() < deadline:
            for rank in range(2):
                got = _scrape(metrics_port + rank)
                if got and got.get(("resam_steps_total", (("rank", str(rank)),)), 0) >= 1:
                    scrapes[rank] = got
            if prometheus is not None and len(rates) < 2:
                positive = {r: v for r, v in _query(prometheus_port, "rate(resam_samples_total[10s])").items()
                            if v > 0}
                rates.update(positive)
            time.sleep(0.5)
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
        train.wait()
        if prometheus is not None:  # every dashboard query is valid PromQL over the scraped series
            dashboard = json.loads((REPO / "launch" / "grafana" / "resam_dashboard.json").read_text())
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$job", ".*").replace("$rank", ".*")
                    dashboard_queries[expr] = _query_status(prometheus_port, expr)
    finally:
        log.close()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    return {"base": base, "rc": train.returncode, "metrics_port": metrics_port, "scrapes": scrapes, "rates": rates,
            "dashboard_queries": dashboard_queries, "log": (base / "train.log").read_text()}


def test_training_under_torchrun_finishes(observed):
    assert observed["rc"] == 0, observed["log"][-4000:]


def test_every_rank_serves_its_metrics_over_http_during_the_run(observed):
    assert sorted(observed["scrapes"]) == [0, 1], "no scrape of both ranks during the run"
    for rank, got in observed["scrapes"].items():
        label = (("rank", str(rank)),)
        steps = got[("resam_steps_total", label)]
        assert steps >= 1
        assert got[("resam_samples_total", label)] >= 2 * steps  # 2 images per rank per step
        assert got[("resam_skipped_steps_total", (("rank", str(rank)), ("reason", "spike")))] == 0
        assert got[("resam_step_duration_seconds_count", label)] >= steps
        assert got[("resam_data_wait_seconds_count", label)] >= steps
        assert got[("resam_images_per_second", label)] > 0
        assert got[("resam_process_resident_memory_bytes", label)] > 50 * 2**20
        assert math.isfinite(got[("resam_loss", (("part", "total"), ("rank", str(rank))))])
        assert ("resam_queue_entries", label) in got


@pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed (Debian package "
                                                "`prometheus`: apt-get install -y prometheus)")
def test_a_prometheus_server_scrapes_both_ranks(observed):
    assert set(observed["rates"]) == {"0", "1"}, (observed["rates"],
                                                  (observed["base"] / "prometheus.log").read_text()[-2000:])
    assert all(rate > 0 for rate in observed["rates"].values())
    queries = observed["dashboard_queries"]
    assert queries and all(status == "success" for status in queries.values()), queries


def test_jsonl_log_holds_the_logged_steps_and_the_metrics_ports(observed):
    """With train.log_every 4 the log holds steps 4, 8 and the last; each carries rank 0's stage
    IoUs (computed only for the micro-batches of logged steps) next to its instance counts."""
    records = read_jsonl(observed["base"] / "run" / "train_log.jsonl")
    start = records[0]
    assert start["event"] == "start" and start["precision"] == "bf16" and start["zero_stage"] == 1
    assert [r["metrics_port"] for r in start["ranks"]] == [observed["metrics_port"], observed["metrics_port"] + 1]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [4, 8, STEPS]
    for record in steps:
        stats = record["stats_rank0"]
        assert {"n_instances", "n_valid", "kept_fraction"} <= set(stats)
        assert all(0.0 <= stats[name] <= 1.0 for name in ("iou_point", "iou_refined", "iou_requery", "iou_pseudo"))
        assert set(record["parts"]) == {"focal", "dice", "iou_mse", "ssa", "total"}
        assert math.isfinite(record["loss"]) and record["lr"] > 0 and record["images_per_second"] > 0
        assert record["images"] == 4 and record["memory"]["rss_bytes"] > 0
    assert records[-1]["event"] == "end"
