"""Smoke test of the benchmark suite: `benchmarks/run.py --quick --no-peers` end to end in a subprocess."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.slow
def test_quick_benchmark_writes_complete_finite_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-peers", "--repeats", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"created", "machine", "sizes", "repeats", "jaxdiff_config"} <= report.keys()
    assert {"cpu", "logical_cores", "jax", "backend", "devices"} <= report["machine"].keys()
    (entry,) = report["sizes"]
    assert entry["size"] == 256
    jd = entry["jaxdiff"]
    assert jd["status"] == "ok", jd
    for key in ("first_call_s", "steady_s", "compile_s", "peak_rss_mb"):
        assert math.isfinite(jd[key]) and jd[key] >= 0, key
    assert jd["steady_s"] > 0 and jd["peak_rss_mb"] > 0
    assert len(jd["times_s"]) == 1
    assert jd["metadata"]["status"] == 0
    quality = jd["quality"]
    for key in ("noise_std", "star_residual_rms", "star_residual_ratio", "transient_recovery", "flux_bias"):
        assert math.isfinite(quality[key]), key
    # A working subtraction on this easy pair: noise near unit, residuals near noise, all transients found.
    assert 0.8 < quality["noise_std"] < 1.2
    assert quality["star_residual_ratio"] < 1.5
    assert quality["transient_recovery"] >= 0.9
    assert abs(quality["flux_bias"]) < 0.05
    task = entry["jaxdiff_task"]  # the task in its own process: its time, memory and stage times
    assert task["status"] == "ok", task
    assert task["steady_s"] > 0 and task["peak_rss_mb"] > 0 and len(task["times_s"]) == 1
    assert task["stages_s"]["subtract"] > 0
    assert entry["peers"] == {}
    assert "jaxdiff" in proc.stdout and "(task)" in proc.stdout and "256" in proc.stdout


@pytest.mark.slow
def test_quick_stream_benchmark_reports_compiles_and_cache_hits(tmp_path):
    """`benchmarks/stream.py --quick`: three distinct 256² pairs in a cold process, then three new ones in a second
    process that finds the first one's persistent cache and compiles less."""
    out = tmp_path / "stream.json"
    proc = subprocess.run(
        [sys.executable, str(RUN.with_name("stream.py")), "--quick", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    cold = report["stream"]["summary"]["256"]
    second = report["second_process"]["summary"]["256"]
    assert len(report["stream"]["pairs"]) == 3 and len(report["second_process"]["pairs"]) == 3
    assert cold["compiles"] >= 2 and second["compiles"] < cold["compiles"]
    pairs = report["stream"]["pairs"]
    for i in range(2, len(pairs)):  # a kernel size seen before, with and without sources: nothing new to compile
        if pairs[i]["kernel_size"] in {p["kernel_size"] for p in pairs[:i]}:
            assert pairs[i]["compiles"] == 0, pairs
    for p in report["stream"]["pairs"] + report["second_process"]["pairs"]:
        assert 0.8 < p["noise"] < 1.2, p
    assert math.isfinite(cold["warm_s"]) and cold["warm_s"] > 0


@pytest.mark.slow
def test_ab_compares_two_revisions_in_one_process(tmp_path):
    """`benchmarks/ab.py` imports two versions of the package side by side and times both on the same pair."""
    repo = RUN.parents[1]
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(RUN.parent / "ab.py"), "--base", "HEAD", "--size", "256", "--calls", "3"]
        + ["--block", "2", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"HEAD", "WORKTREE"}
    for times in report["times_s"].values():
        assert len(times) == 3 and all(math.isfinite(t) and t > 0 for t in times)  # blocks of 2, then 1
    assert report["block"] == 2
    assert "B / A" in proc.stdout
