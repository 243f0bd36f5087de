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
    assert entry["peers"] == {}
    assert "jaxdiff" in proc.stdout and "256" in proc.stdout
