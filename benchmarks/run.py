"""`make bench`: jaxdiff end to end on simulated pairs, side by side with SFFT, OIS and HOTPANTS.

Per size the pair is simulated once in this process (which keeps the truth); every method then runs in a
fresh worker process (this same script with `--worker`) so that its peak RSS is its own and a peer that
hangs or runs out of memory is killed without taking the run down. Quality is computed here, by the same
code for every method. Results: `benchmarks/results/bench-<time>.json` (and `latest.json`) plus a table on
stdout.

    python benchmarks/run.py                       # 1024, 2048, 4096
    python benchmarks/run.py --sizes 2048 --repeats 5 --peers sfft
    python benchmarks/run.py --quick --no-peers    # smoke run (the test)
    python benchmarks/run.py --batch 16 --sizes 4096 --no-peers   # vmap over 16 pairs (GPU)
"""

import argparse
import datetime
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import peers as peer_codes

RESULTS = Path(__file__).resolve().parent / "results"
BAD_PLANES = ("EDGE", "NO_DATA", "BAD", "SAT")
BORDER = 20  # ignored by every method's quality numbers: no star or transient is centred closer

# The simulated pair: PSFs σ 2.0 (template) and 2.4 (science) px varying ±10 % over the field, a ±10 % sky
# gradient, Poisson + read noise, stars with dN/dF ∝ F^-1.5 and transients in the science only.
SIM = dict(
    n_stars=300,
    template_sigma=2.0,
    science_sigma=2.4,
    sigma_variation=0.1,
    sky_gradient=0.1,
    n_transients=40,
    transient_flux_range=(1e3, 2e4),
)
# Skies differ (300 vs 200 counts) and the peers all fit a differential background, so jaxdiff subtracts
# its fitted one too (LSST's default leaves it in, as LSST images arrive background-subtracted).
CONFIG = dict(do_subtract_background=True)
QUICK = dict(size=256, n_stars=100, n_transients=10)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="square image sides")
    p.add_argument("--quick", action="store_true", help=f"smoke run: one {QUICK['size']}² pair")
    p.add_argument("--repeats", type=int, default=3, help="warm calls per method (median reported)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-stars", type=int, default=None, help=f"stars per pair (default {SIM['n_stars']})")
    p.add_argument("--peers", nargs="*", default=list(peer_codes.NAMES), choices=peer_codes.NAMES)
    p.add_argument("--no-peers", action="store_true", help="run jaxdiff only")
    p.add_argument("--peer-timeout", type=float, default=600.0, help="seconds per peer and size")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for jaxdiff per size")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for peers (default: all)")
    p.add_argument("--batch", type=int, default=0, help="also time jax.vmap over N pairs of the last size")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default results/bench-<time>.json)")
    p.add_argument("--worker", choices=("jaxdiff", "task", "peer", "batch"), help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--diff", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=peer_codes.NAMES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _simulate(size: int, seed: int, n_stars: int, n_transients: int):
    from jaxdiff.sim import simulate_pair

    kw = {**SIM, "n_stars": n_stars, "n_transients": n_transients}
    return simulate_pair((size, size), seed=seed, **kw)


def _bad_bits(planes) -> int:
    table = dict(planes)
    return sum(1 << table[name] for name in BAD_PLANES if name in table)


# --------------------------------------------------------------------------- workers (fresh processes)


def _worker_jaxdiff(args) -> dict:
    """Time `jd.subtract` on one pickled pair (the pure function, as a notebook calls it)."""
    import jax

    import jaxdiff as jd

    with args.input.open("rb") as f:
        template, science, sources = pickle.load(f)
    rss_inputs = harness.peak_rss_mb()
    config = jd.SubtractConfig(**CONFIG)
    with jax.enable_x64(True):
        timing = harness.time_calls(
            lambda: jd.subtract(template, science, sources, config), args.repeats, jax.block_until_ready
        )
        peak = harness.peak_rss_mb()
        result = timing.pop("result")
    diff = result.difference
    metadata = {k: np.asarray(v).tolist() for k, v in jax.device_get(result.metadata).items()}
    np.savez(
        args.diff,
        image=np.asarray(diff.image),
        variance=np.asarray(diff.variance),
        bad=(np.asarray(diff.mask) & _bad_bits(diff.mask_planes)) != 0,
        psf=np.asarray(diff.psf.image(), np.float64),
    )
    return {
        **timing,
        "peak_rss_mb": peak,
        "inputs_rss_mb": rss_inputs,
        "metadata": metadata,
        "device": str(jax.devices()[0]),
    }


def _worker_task(args) -> dict:
    """Time `AlardLuptonSubtract.run` on one pickled pair: what the CLI and pipelines run. Its entry point
    limits BLAS threads and trims the heap after compiling; the persistent cache is off here, so the first
    call compiles as in `_worker_jaxdiff`. Returns its times, peak RSS and the task's stage times."""
    os.environ["JAXDIFF_CACHE_DIR"] = "off"
    import jax

    import jaxdiff as jd

    with args.input.open("rb") as f:
        template, science, sources = pickle.load(f)
    rss_inputs = harness.peak_rss_mb()
    task = jd.AlardLuptonSubtract(config=jd.SubtractConfig(**CONFIG))
    timing = harness.time_calls(
        lambda: task.run(template, science, sources), args.repeats, lambda r: jax.block_until_ready(r.difference) and r
    )
    meta = timing.pop("result").metadata
    return {
        **timing,
        "peak_rss_mb": harness.peak_rss_mb(),
        "inputs_rss_mb": rss_inputs,
        "stages_s": {k.removeprefix("timing."): v for k, v in meta.items() if k.startswith("timing.")},
    }


def _worker_peer(args) -> dict:
    """Time one peer on one pair (arrays in an npz) and save its difference image."""
    inputs = dict(np.load(args.input))
    inputs = {k: (v.item() if v.ndim == 0 else v) for k, v in inputs.items()}
    threads = args.threads or len(os.sched_getaffinity(0))
    run = peer_codes.RUNNERS[args.peer]
    with tempfile.TemporaryDirectory() as tmp:
        timing = harness.time_calls(
            lambda: run(inputs, Path(tmp), threads), args.repeats, lambda r: r, budget_s=args.peer_timeout / 2
        )
    out = timing.pop("result")
    np.savez(
        args.diff,
        image=out.difference,
        variance=np.full(1, np.nan) if out.variance is None else out.variance,
        bad=np.zeros(out.difference.shape, bool) if out.bad is None else out.bad,
    )
    return {**timing, "peak_rss_mb": harness.peak_rss_mb(), "note": out.note, "threads": threads}


def _worker_batch(args) -> dict:
    """`jax.vmap` of `jd.subtract` over N stacked pairs of one shape; per-pair steady-state time.

    The pairs share their PSF models (one observing setup, as in a survey batch), which are closed over
    so that the static plan (kernel size) is resolved exactly as for a single pair; images, variances,
    masks, origins and sources are batched. With several devices the batch axis is sharded over them.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import jaxdiff as jd

    n, size = args.batch, args.sizes[0]
    distinct = min(n, 4)
    pairs = []
    for i in range(distinct):
        p = _simulate(size, args.seed + i, args.n_stars or SIM["n_stars"], SIM["n_transients"])
        pairs.append((p.template, p.science, p.sources))
        del p
    pairs = [pairs[i % distinct] for i in range(n)]
    psf_t, psf_s = pairs[0][0].psf, pairs[0][1].psf
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *pairs)
    del pairs
    devices = jax.devices()
    if len(devices) > 1 and n % len(devices) == 0:
        mesh = jax.make_mesh((len(devices),), ("pairs",), axis_types=(jax.sharding.AxisType.Auto,))
        stacked = jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pairs")))
    config = jd.SubtractConfig(**CONFIG)

    def one(template, science, sources):
        template = eqx.tree_at(lambda e: e.psf, template, psf_t)
        science = eqx.tree_at(lambda e: e.psf, science, psf_s)
        return jd.subtract(template, science, sources, config)

    # No outer jit: the plan needs the PSF widths as concrete numbers, and `jd.subtract` jits its core.
    batched = jax.vmap(one)
    with jax.enable_x64(True):
        timing = harness.time_calls(lambda: batched(*stacked), args.repeats, jax.block_until_ready)
    result = timing.pop("result")
    status = np.asarray(result.metadata["status"])
    return {
        **timing,
        "n_pairs": n,
        "distinct_pairs": distinct,
        "size": size,
        "per_pair_s": timing["steady_s"] / n,
        "n_failed": int(np.sum(status != 0)),
        "peak_rss_mb": harness.peak_rss_mb(),
        "device": f"{len(devices)}× {devices[0].device_kind}",
        "sharded": len(devices) > 1 and n % len(devices) == 0,
    }


WORKERS = {"jaxdiff": _worker_jaxdiff, "task": _worker_task, "peer": _worker_peer, "batch": _worker_batch}


# --------------------------------------------------------------------------- orchestration


def _peer_inputs(pair) -> dict:
    t, s, src = pair.template, pair.science, pair.sources
    valid = np.asarray(src.valid)
    x0, y0 = (int(v) for v in np.asarray(s.xy0))
    return {
        "template_image": np.asarray(t.image, np.float64),
        "science_image": np.asarray(s.image, np.float64),
        "template_mask": np.asarray(t.mask),
        "science_mask": np.asarray(s.mask),
        "sources_x": np.asarray(src.x)[valid] - x0,
        "sources_y": np.asarray(src.y)[valid] - y0,
        "science_fwhm": float(s.psf.fwhm()),
        "template_fwhm": float(t.psf.fwhm()),
        "detected_bit": dict(s.mask_planes).get("DETECTED"),
        "gain": 1.0,
        "read_noise": 5.0,
    }


def _run_size(size: int, args, tmp: Path, gave_up: dict) -> dict:
    """Simulate one pair, run jaxdiff and the peers on it, and judge them against the truth.

    `gave_up` maps a peer to the reason it failed at a smaller size; it is not retried at larger ones.
    """
    n_stars = QUICK["n_stars"] if args.quick else (args.n_stars or SIM["n_stars"])
    n_transients = QUICK["n_transients"] if args.quick else SIM["n_transients"]
    t0 = time.perf_counter()
    pair = _simulate(size, args.seed, n_stars, n_transients)
    entry = {
        "size": size,
        "simulation": {**SIM, "n_stars": n_stars, "n_transients": n_transients, "seed": args.seed},
        "simulate_s": time.perf_counter() - t0,
    }
    truth, xy0 = pair.truth, tuple(int(v) for v in np.asarray(pair.science.xy0))
    naive_var = np.asarray(pair.science.variance, np.float64) + np.asarray(pair.template.variance, np.float64)
    science_psf = np.asarray(pair.science.psf.image(), np.float64)
    pkl, npz = tmp / f"pair{size}.pkl", tmp / f"pair{size}.npz"
    with pkl.open("wb") as f:
        pickle.dump((pair.template, pair.science, pair.sources), f)
    np.savez(npz, **_peer_inputs(pair))
    del pair

    common = ["--repeats", str(args.repeats)]
    diff = tmp / f"jaxdiff{size}.npz"
    worker = ["--worker", "jaxdiff", "--input", str(pkl), "--diff", str(diff)]
    report, message = harness.run_worker([*worker, "--report", str(tmp / "jd.json"), *common], args.timeout)
    if report is None:
        entry["jaxdiff"] = {"status": "failed", "message": message}
    else:
        d = np.load(diff)
        q = harness.quality(d["image"], d["variance"], d["bad"], d["psf"], truth, xy0, BORDER)
        entry["jaxdiff"] = {"status": "ok", **report, "quality": q, "variance_source": "propagated"}
    jd_time = entry["jaxdiff"].get("steady_s")
    worker = ["--worker", "task", "--input", str(pkl), "--report", str(tmp / "task.json"), *common]
    report, message = harness.run_worker(worker, args.timeout)
    entry["jaxdiff_task"] = {"status": "failed", "message": message} if report is None else {"status": "ok", **report}

    entry["peers"] = {}
    for name in [] if args.no_peers else args.peers:
        ok, why = peer_codes.ensure_hotpants() if name == "hotpants" else peer_codes.available(name)
        if name in gave_up:
            ok, why = False, gave_up[name]
        if not ok:
            entry["peers"][name] = {"status": "skipped", "message": why}
            continue
        diff = tmp / f"{name}{size}.npz"
        worker = ["--worker", "peer", "--peer", name, "--input", str(npz), "--diff", str(diff)]
        if args.threads:
            worker += ["--threads", str(args.threads)]
        report_path = tmp / f"{name}.json"
        report, message = harness.run_worker([*worker, "--report", str(report_path), *common], args.peer_timeout)
        if report is None:
            entry["peers"][name] = {"status": "skipped", "message": message}
            gave_up[name] = f"not retried: at {size}² it {message}"
            continue
        d = np.load(diff)
        own_var = d["variance"].shape == d["image"].shape
        var = d["variance"] if own_var else naive_var
        q = harness.quality(d["image"], var, d["bad"], science_psf, truth, xy0, BORDER)
        entry["peers"][name] = {
            "status": "ok",
            **report,
            "quality": q,
            "variance_source": "own" if own_var else "naive science + template",
            "time_ratio": report["steady_s"] / jd_time if jd_time else None,
        }
    return entry


def _main_run(args) -> int:
    sizes = [QUICK["size"]] if args.quick else args.sizes
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": harness.machine_info(),
        "repeats": args.repeats,
        "jaxdiff_config": CONFIG,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="jaxdiff-bench-") as tmp:
        gave_up = {}
        for size in sizes:
            report["sizes"].append(_run_size(size, args, Path(tmp), gave_up))
            print(f"[bench] {size}² done", file=sys.stderr, flush=True)
        if args.batch:
            worker = ["--worker", "batch", "--batch", str(args.batch), "--sizes", str(sizes[-1])]
            worker += ["--seed", str(args.seed), "--repeats", str(args.repeats)]
            if args.n_stars:
                worker += ["--n-stars", str(args.n_stars)]
            batch, message = harness.run_worker([*worker, "--report", str(Path(tmp) / "b.json")], args.timeout)
            report["batch"] = {"status": "ok", **batch} if batch else {"status": "failed", "message": message}
    out = args.output
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"bench-{stamp}.json"
    text = harness.write_json(out, report)
    if args.output is None:
        (RESULTS / "latest.json").write_text(text)
    sys.stdout.write(f"{report['machine']['cpu']} · {report['machine']['usable_cores']} cores · ")
    sys.stdout.write(f"jax {report['machine']['jax']} · {', '.join(report['machine']['devices'])}\n")
    sys.stdout.write(harness.table(report) + f"\n\nJSON: {out}\n")
    return 0 if all(e["jaxdiff"]["status"] == "ok" for e in report["sizes"]) else 1


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        args.report.write_text(json.dumps(harness.to_jsonable(result)))
        return 0
    return _main_run(args)


if __name__ == "__main__":
    sys.exit(main())
