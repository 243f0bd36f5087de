"""Benchmark harness: machine description, timing, peak memory, quality against truth, JSON and tables.

Everything here is method-agnostic: a subtraction is judged only from its difference image (and variance
plane when it has one) against the `jaxdiff.sim.Truth` of the simulated pair, so jaxdiff and its peers are
measured by the same code.
"""

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

EMPTY_RADIUS_SIGMA = 7.0  # empty sky: farther than 7 σ_PSF from every star and transient
STAR_RADIUS_SIGMA = 3.0  # star residuals: within 3 σ_PSF of a star centre
MATCH_RADIUS = 2.0  # a transient is recovered by a > 5σ peak within 2 px of its true position
DETECTION_SIGMA = 5.0


def machine_info() -> dict:
    """CPU model, core count, memory, OS, Python/jax/numpy versions and the jax devices."""
    import jax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory_gb = psutil.virtual_memory().total / 2**30
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        memory_gb, physical = None, None
    devices = jax.devices()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": memory_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "n_devices": len(devices),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    On Linux this is VmHWM of /proc/self/status: `getrusage`'s ru_maxrss survives exec, so a worker started
    by the benchmark inherited the parent's RSS at fork time (the simulated 4096² pair made every worker's
    "peak" at least 2.5 GB). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) / 2**10
    except OSError:
        pass
    scale = 1.0 / 2**20 if sys.platform == "darwin" else 1.0 / 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def time_calls(
    fn: Callable[[], object], repeats: int, block: Callable[[object], object], budget_s: float = float("inf")
) -> dict:
    """Time a cold first call and up to `repeats` warm calls of `fn`, blocking on each result.

    Arguments:
        fn: the call to time (no arguments).
        repeats: number of warm calls wanted (≥ 1).
        block: applied to each result before the clock is read (`jax.block_until_ready` for jax).
        budget_s: no further warm call is started when it would likely end past this many seconds
            from the start (slow peers); at least one warm call is made unless the first call alone
            used the budget.

    Returns:
        dict with `first_call_s` (trace + compile + one run), `times_s` (warm calls), `steady_s`
        (their median; the first call when there was none), `compile_s` (first call minus the steady
        state; None without a warm call) and the last result under `result`.
    """
    start = time.perf_counter()
    result = block(fn())
    first = time.perf_counter() - start
    times = []
    while len(times) < max(repeats, 1):
        last = times[-1] if times else first
        if time.perf_counter() - start + last > budget_s:
            break
        result = None  # drop the previous result first: peak memory is that of one subtraction, not two
        t0 = time.perf_counter()
        result = block(fn())
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times) if times else first
    return {
        "first_call_s": first,
        "times_s": times,
        "steady_s": steady,
        "compile_s": max(first - steady, 0.0) if times else None,
        "result": result,
    }


def disk_map(shape, xs, ys, radius: float) -> np.ndarray:
    """Boolean map of the pixels within `radius` of any of the (x, y) array positions."""
    hit = np.zeros(shape, bool)
    r = int(np.ceil(radius))
    off = np.arange(-r, r + 1)
    for x, y in zip(np.asarray(xs), np.asarray(ys), strict=True):
        ix, iy = int(round(x)), int(round(y))
        cols, rows = ix + off, iy + off
        d2 = (cols[None, :] - x) ** 2 + (rows[:, None] - y) ** 2
        keep_r = (rows >= 0) & (rows < shape[0])
        keep_c = (cols >= 0) & (cols < shape[1])
        sub = (d2 <= radius**2) & keep_r[:, None] & keep_c[None, :]
        rr, cc = np.nonzero(sub)
        hit[rows[rr], cols[cc]] = True
    return hit


def shifted_psf(psf: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The centred unit-sum PSF image moved by a sub-pixel (dx, dy) with a Fourier shift, renormalised."""
    ny, nx = psf.shape
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    phase = np.exp(-2j * np.pi * (fx * dx + fy * dy))
    out = np.fft.irfft2(np.fft.rfft2(psf) * phase, s=psf.shape)
    return out / out.sum()


def psf_fit_flux(image, variance, usable, psf: np.ndarray, x: float, y: float, profiles=None) -> float:
    """Weighted least-squares amplitude of the PSF at array position (x, y): Σ P D / V ÷ Σ P² / V.

    `profiles`: optional (actual, model) centred PSF images of equal size. When the object's profile in the
    image differs from the fitted PSF by a known factor — a decorrelated difference has P ∗ c where P was
    injected — the amplitude is divided by the fit's response to `actual` relative to `model`, computed with
    the same pixel weights (the weights 1/V fall on bright objects' cores, so a response computed without them
    leaves a bias of about 1 % for 10⁴-count transients).
    """
    h = psf.shape[0] // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    ny, nx = image.shape
    if iy - h < 0 or ix - h < 0 or iy + h >= ny or ix + h >= nx:
        return float("nan")
    sl = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
    p = shifted_psf(psf, x - ix, y - iy)
    good = usable[sl]
    if good.sum() < 0.5 * p.size:
        return float("nan")
    w = np.where(good, 1.0 / variance[sl], 0.0)
    flux = float(np.sum(w * p * image[sl]) / np.sum(w * p * p))
    if profiles is None:
        return flux
    actual, model = (_to_size(shifted_psf(a, x - ix, y - iy), p.shape[0]) for a in profiles)
    response = np.sum(w * model * actual) / np.sum(w * model * model)
    return float(flux / response)


def quality(
    difference: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    psf: np.ndarray,
    truth,
    xy0: tuple[int, int],
    border: int,
) -> dict:
    """Quality of a difference image against the simulation truth.

    Arguments:
        difference: the difference image (science minus template, science flux units, science box).
        variance: its per-pixel variance (the method's own plane, or the naive science + template sum).
        bad: pixels the method flags as unusable (EDGE, NO_DATA, ...); non-finite pixels are added.
        psf: the difference image's PSF (odd, centred, unit sum) used for matched filtering and fluxes.
        truth: the `jaxdiff.sim.Truth` of the pair.
        xy0: parent origin of the science array.
        border: pixels within this distance of the array edge are ignored by every method.

    Returns:
        dict of `noise_std` (std of difference/√variance over empty sky: 1 when the variance is right),
        `star_residual_rms` (rms of difference/√variance within 3σ_PSF of the stars), `star_residual_ratio`
        (the two divided: 1 when star residuals are indistinguishable from noise), `transient_recovery`
        (fraction of transients with a > 5σ matched-filter peak within 2 px), `false_detections` (> 5σ
        peaks farther than 3σ_PSF from every transient), `flux_bias` (median PSF-fit flux / true − 1), and
        the pixel and object counts behind them. Fluxes assume a convolveTemplate difference (science PSF).
    """
    image = np.asarray(difference, np.float64)
    var = np.asarray(variance, np.float64)
    shape = image.shape
    usable = ~np.asarray(bad, bool) & np.isfinite(image) & np.isfinite(var) & (var > 0)
    inner = np.zeros(shape, bool)
    inner[border : shape[0] - border, border : shape[1] - border] = True
    usable &= inner
    centre = np.asarray(truth.psf_science.image(), np.float64)
    sigma_psf = float(np.sqrt(np.sum(centre * _r2(centre.shape)) / 2.0))
    sx = np.asarray(truth.stars_x) + truth.shift[0] - xy0[0]
    sy = np.asarray(truth.stars_y) + truth.shift[1] - xy0[1]
    tx = np.asarray(truth.transients_x) - xy0[0]
    ty = np.asarray(truth.transients_y) - xy0[1]
    objects_x, objects_y = np.concatenate([sx, tx]), np.concatenate([sy, ty])
    empty = usable & ~disk_map(shape, objects_x, objects_y, EMPTY_RADIUS_SIGMA * sigma_psf)
    near_star = usable & disk_map(shape, sx, sy, STAR_RADIUS_SIGMA * sigma_psf)
    near_star &= ~disk_map(shape, tx, ty, EMPTY_RADIUS_SIGMA * sigma_psf)
    z = np.where(usable, image / np.sqrt(np.where(usable, var, 1.0)), 0.0)
    noise_std = float(np.std(z[empty]))
    star_rms = float(np.sqrt(np.mean(z[near_star] ** 2)))

    # Matched filter: S/N = (D ⋆ P) / √(V ⋆ P²), rescaled so that the empty sky has unit spread (this
    # absorbs the pixel-to-pixel correlations an undecorrelated difference has).
    d0 = np.where(usable, image, 0.0)
    w0 = np.where(usable, var, 0.0)
    num = ndimage.correlate(d0, psf, mode="constant")
    den = np.sqrt(ndimage.correlate(w0, psf * psf, mode="constant"))
    snr = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    snr /= np.std(snr[empty])
    found = np.zeros(len(tx), bool)
    r = int(np.ceil(MATCH_RADIUS))
    for i, (x, y) in enumerate(zip(tx, ty, strict=True)):
        ix, iy = int(round(x)), int(round(y))
        y0, y1 = max(iy - r, 0), min(iy + r + 1, shape[0])
        x0, x1 = max(ix - r, 0), min(ix + r + 1, shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        close = (xx - x) ** 2 + (yy - y) ** 2 <= MATCH_RADIUS**2
        found[i] = bool(np.any(snr[y0:y1, x0:x1][close] > DETECTION_SIGMA))
    peaks = (snr > DETECTION_SIGMA) & (snr == ndimage.maximum_filter(snr, size=5)) & usable
    peaks &= ~disk_map(shape, tx, ty, STAR_RADIUS_SIGMA * sigma_psf)
    # Fluxes: fit the true science PSF at each transient (the PSF varies over the field), divided by the same
    # weighted fit's response to the difference PSF relative to the science PSF, both at the centre (exactly
    # 1 unless the difference was decorrelated).
    a, b = _common_size(psf, centre)
    fluxes = np.array(
        [
            psf_fit_flux(image, var, usable, np.asarray(truth.psf_science.image(x + xy0[0], y + xy0[1])), x, y, (a, b))
            for x, y in zip(tx, ty, strict=True)
        ]
    )
    ratio = fluxes / np.asarray(truth.transients_flux)
    ratio = ratio[np.isfinite(ratio)]
    return {
        "noise_std": noise_std,
        "star_residual_rms": star_rms,
        "star_residual_ratio": star_rms / noise_std,
        "transient_recovery": float(found.mean()) if len(found) else float("nan"),
        "false_detections": int(peaks.sum()),
        "flux_bias": float(np.median(ratio) - 1.0) if len(ratio) else float("nan"),
        "n_empty_pixels": int(empty.sum()),
        "n_star_pixels": int(near_star.sum()),
        "n_transients": len(tx),
        "n_flux_measured": len(ratio),
    }


def _common_size(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two centred odd-sized images zero-padded to the larger side."""
    n = max(a.shape[0], b.shape[0])

    def pad(x):
        p = (n - x.shape[0]) // 2
        return np.pad(np.asarray(x, np.float64), p)

    return pad(a), pad(b)


def _to_size(x: np.ndarray, n: int) -> np.ndarray:
    """A centred odd-sized image cropped or zero-padded to n × n (n odd)."""
    m = x.shape[0]
    if m >= n:
        o = (m - n) // 2
        return np.asarray(x[o : o + n, o : o + n], np.float64)
    return np.pad(np.asarray(x, np.float64), (n - m) // 2)


def _r2(shape) -> np.ndarray:
    """Squared distance of each pixel from the centre of an odd-sized array."""
    h0, h1 = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (x - h1) ** 2 + (y - h0) ** 2


def run_worker(argv: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """Run `python benchmarks/run.py <argv>` in a fresh process (so its peak RSS is its own).

    Arguments:
        argv: worker arguments; the worker writes its JSON report to the path after `--report`.
        timeout_s: wall-clock limit; the worker is killed past it.

    Returns:
        (report dict or None, message): None with the reason when the worker failed or timed out.
    """
    report = Path(argv[argv.index("--report") + 1])
    cmd = [sys.executable, str(Path(__file__).with_name("run.py")), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    if proc.returncode != 0 or not report.exists():
        if proc.returncode in (-9, 137):
            return None, "killed by SIGKILL (out of memory?)"
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"exit code {proc.returncode}: {' | '.join(tail)}"
    return json.loads(report.read_text()), "ok"


def write_json(path: Path, report) -> str:
    """Write a report as indented JSON (non-finite floats as null, folders created); returns the text."""
    text = json.dumps(to_jsonable(report), indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def to_jsonable(obj):
    """Recursively turn numpy scalars/arrays and non-finite floats into JSON-safe values (NaN → None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _fmt(value, spec: str) -> str:
    """`format(value, spec)`, or a dash of the same width for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—".rjust(int(spec.split(".")[0].rstrip("df") or 0))
    return format(value, spec)


def table(report: dict) -> str:
    """A plain-text table of a run report: one row per size and method."""
    head = (
        f"{'size':>6} {'method':<10} {'steady s':>9} {'compile s':>9} {'ratio':>6} {'RSS MB':>7} "
        f"{'noise':>6} {'star':>6} {'recov':>6} {'false':>5} {'bias %':>7}  note"
    )
    lines = [head, "-" * len(head)]
    for entry in report["sizes"]:
        size = entry["size"]
        rows = [("jaxdiff", entry["jaxdiff"])]
        if "jaxdiff_task" in entry:  # the task's times and memory (its quality is that of the same program)
            rows.append(("  (task)", entry["jaxdiff_task"]))
        rows += list(entry.get("peers", {}).items())
        for name, res in rows:
            if res.get("status") != "ok":
                lines.append(f"{size:>6} {name:<10} {'skipped: ' + res.get('message', '')}")
                continue
            q = res.get("quality", {})
            bias = q.get("flux_bias")
            lines.append(
                f"{size:>6} {name:<10} {_fmt(res.get('steady_s'), '9.3f')} "
                f"{_fmt(res.get('compile_s'), '9.2f')} {_fmt(res.get('time_ratio'), '6.2f')} "
                f"{_fmt(res.get('peak_rss_mb'), '7.0f')} {_fmt(q.get('noise_std'), '6.3f')} "
                f"{_fmt(q.get('star_residual_ratio'), '6.3f')} {_fmt(q.get('transient_recovery'), '6.2f')} "
                f"{_fmt(q.get('false_detections'), '5d')} "
                f"{_fmt(None if bias is None else 100 * bias, '7.2f')}  {res.get('note', '')}"
            )
    if report.get("batch"):
        b = report["batch"]
        if b.get("status") == "ok":
            lines.append(
                f"batch: {b['n_pairs']} pairs of {b['size']}² on {b['device']}: "
                f"{b['per_pair_s'] * 1e3:.1f} ms per pair (steady {b['steady_s']:.3f} s, compile "
                f"{b['compile_s']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB)"
            )
        else:
            lines.append(f"batch: {b.get('message')}")
    return "\n".join(lines)
