"""`make bench` stream mode: distinct pairs per size through the task API, as a survey sends them.

Each size gets N different simulated pairs (template σ 1.2–3.0 px, science 5–45 % wider and at most 4 px, 150–1000
stars, every second pair with `sources=None`). They run through one `AlardLuptonSubtract` in a fresh process
with an empty persistent compilation cache ("stream": compiles included, amortised per pair), then the last
pair three more times ("warm"), then N *new* pairs of the same sizes in a second fresh process that finds the
cache of the first ("second process"), and finally N new pairs in a fresh process whose empty cache was filled by
`AlardLuptonSubtract.precompile` on one example pair, every kernel side compiled ("precompiled"; the deployment
step's seconds are reported apart). HOTPANTS runs on the first stream's pairs (built from
`../shared/peers/hotpants` when not on PATH); its per-pair mean is the × HP reference of every row. JSON to
`benchmarks/results/stream-<time>.json`.

    python benchmarks/stream.py                        # 1024, 2048; 8 pairs each
    python benchmarks/stream.py --sizes 2048 --pairs 12
    python benchmarks/stream.py --quick                # smoke run: 256², 3 pairs
"""

import argparse
import datetime
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import peers as peer_codes

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ("stream", "second_process", "precompiled")
CONFIG = dict(do_subtract_background=True)  # as run.py: the peers subtract their fitted background too
BORDER = 20


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--pairs", type=int, default=8, help="distinct pairs per size and process")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="smoke run: 256², 3 pairs, no HOTPANTS, no precompiled run")
    p.add_argument("--no-hotpants", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker process")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--precompile-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _spec(rng, size: int, i: int) -> dict:
    st = float(rng.uniform(1.2, 3.0))
    return dict(
        size=size,
        seed=int(rng.integers(1 << 30)),
        template_sigma=st,
        science_sigma=float(min(4.0, st * rng.uniform(1.05, 1.45))),
        n_stars=int(rng.integers(150, 1001) if size >= 1024 else rng.integers(40, 120)),
        n_transients=20 if size >= 1024 else 5,
        sources=i % 2 == 0,
    )


def _simulate(spec: dict):
    from jaxdiff.sim import simulate_pair

    kw = {k: spec[k] for k in ("seed", "template_sigma", "science_sigma", "n_stars", "n_transients")}
    return simulate_pair((spec["size"], spec["size"]), sigma_variation=0.1, sky_gradient=0.1, **kw)


# --------------------------------------------------------------------------- worker (a fresh process)


def _worker(path: Path) -> dict:
    """Run the pickled stream through one task; per pair: wall time, compilations and their seconds, quality."""
    import jax
    import run as bench
    from jax import monitoring

    import jaxdiff as jd

    compiles, hits = [], []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":  # compilations and persistent-cache reads
            compiles.append(duration)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(1)

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    with path.open("rb") as f:
        stream = pickle.load(f)
    task = jd.AlardLuptonSubtract(**CONFIG)
    rows = []
    last = None
    for spec, template, science, sources, truth in stream:
        c0, h0 = len(compiles), len(hits)
        t0 = time.perf_counter()
        result = task.run(template, science, sources if spec["sources"] else None)
        wall = time.perf_counter() - t0
        n_compiles, n_hits, compile_s = len(compiles) - c0, len(hits) - h0, float(sum(compiles[c0:]))
        diff = result.difference
        bad = (np.asarray(diff.mask) & bench._bad_bits(diff.mask_planes)) != 0
        q = harness.quality(
            np.asarray(diff.image),
            np.asarray(diff.variance),
            bad,
            np.asarray(diff.psf.image(), np.float64),
            truth,
            tuple(int(v) for v in np.asarray(science.xy0)),
            BORDER,
        )
        md = result.metadata
        rows.append(
            {
                **spec,
                "wall_s": wall,
                "compiles": n_compiles - n_hits,
                "cache_hits": n_hits,
                "compile_s": compile_s,  # compiling and reading the persistent cache
                "kernel_size": md["kernel_size"],
                "mode": md["mode"],
                "n_stamps_used": md["n_stamps_used"],
                "noise": q.get("noise_std"),
                "star": q.get("star_residual_ratio"),
                "transients": q.get("transient_recovery"),
                "flux_bias": q.get("flux_bias"),
            }
        )
        last = (template, science, sources if spec["sources"] else None)
        print(
            f"[stream] {spec['size']}² pair {len(rows)}: {wall:.2f} s, {rows[-1]['compiles']} compiles",
            file=sys.stderr,
            flush=True,
        )
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        task.run(*last)
        warm.append(time.perf_counter() - t0)
    return {"pairs": rows, "warm_s": statistics.median(warm), "device": str(jax.devices()[0])}


def _precompile_worker(path: Path) -> dict:
    """`AlardLuptonSubtract.precompile` on the first pair of the pickled stream: {kernel side: seconds}."""
    import jaxdiff as jd

    with path.open("rb") as f:
        spec, template, science, sources, _ = pickle.load(f)[0]
    task = jd.AlardLuptonSubtract(**CONFIG)
    return task.precompile(template, science, sources if spec["sources"] else None)


def _run_worker(path: Path, cache: Path, timeout: float, precompile: bool = False) -> dict:
    report = path.with_suffix(".precompile.json" if precompile else ".json")
    env = {**os.environ, "JAXDIFF_CACHE_DIR": str(cache)}
    cmd = [sys.executable, __file__, "--worker", str(path), "--report", str(report)]
    subprocess.run(cmd + (["--precompile-only"] if precompile else []), env=env, check=True, timeout=timeout)
    return json.loads(report.read_text())


def _hotpants(stream: list) -> list[dict]:
    import run as bench

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec, template, science, sources, truth in stream:
            pair = type("Pair", (), dict(template=template, science=science, sources=sources))
            inputs = bench._peer_inputs(pair)
            t0 = time.perf_counter()
            out = peer_codes.run_hotpants(inputs, Path(tmp), 1)
            wall = time.perf_counter() - t0
            q = harness.quality(
                out.difference,
                out.variance,
                out.bad,
                np.asarray(science.psf.image(), np.float64),
                truth,
                tuple(int(v) for v in np.asarray(science.xy0)),
                BORDER,
            )
            rows.append(
                {
                    "size": spec["size"],
                    "wall_s": wall,
                    "noise": q.get("noise_std"),
                    "star": q.get("star_residual_ratio"),
                }
            )
    return rows


def _summary(rows: list[dict], warm: dict, sizes) -> dict:
    out = {}
    for size in sizes:
        mine = [r for r in rows if r["size"] == size]
        total = sum(r["wall_s"] for r in mine)
        out[size] = {
            "per_pair_s": total / len(mine),
            "compiles": sum(r["compiles"] for r in mine),
            "cache_hits": sum(r["cache_hits"] for r in mine),
            "compile_s": sum(r["compile_s"] for r in mine),
            "first_pair_s": mine[0]["wall_s"],
            "warm_s": warm.get(size),
        }
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        work = _precompile_worker if args.precompile_only else _worker
        args.report.write_text(json.dumps(harness.to_jsonable(work(args.worker))))
        return 0
    sizes, n = ([256], 3) if args.quick else (args.sizes, args.pairs)
    runs = RUNS[:2] if args.quick else RUNS  # the smoke run skips the precompiled process (tests cover precompile)
    rng = np.random.default_rng(args.seed)
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": harness.machine_info(),
        "config": CONFIG,
        "sizes": sizes,
        "pairs_per_size": n,
        "runs": list(runs),
    }
    use_hotpants = not (args.quick or args.no_hotpants) and peer_codes.ensure_hotpants()[0]
    with tempfile.TemporaryDirectory(prefix="jaxdiff-stream-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "xla"
        for run in runs:
            stream_rows, warm, hp, precompiled = [], {}, [], {}
            for size in sizes:
                stream = []
                for i in range(n):
                    spec = _spec(rng, size, i)
                    pair = _simulate(spec)
                    stream.append((spec, pair.template, pair.science, pair.sources, pair.truth))
                path = tmp / f"{run}{size}.pkl"
                with path.open("wb") as f:
                    pickle.dump(stream, f)
                run_cache = tmp / "xla-precompiled" if run == "precompiled" else cache
                if run == "precompiled":  # a deployment step on one example pair, then a fresh process
                    precompiled[size] = _run_worker(path, run_cache, args.timeout, precompile=True)
                res = _run_worker(path, run_cache, args.timeout)
                stream_rows += res["pairs"]
                warm[size] = res["warm_s"]
                if use_hotpants and run == "stream":
                    hp += _hotpants(stream)
                del stream
            report[run] = {"pairs": stream_rows, "summary": _summary(stream_rows, warm, sizes)}
            if precompiled:
                report[run]["precompile_s"] = precompiled
            if hp:
                report["hotpants"] = {
                    "pairs": hp,
                    "per_pair_s": {s: statistics.mean(r["wall_s"] for r in hp if r["size"] == s) for s in sizes},
                }
    out = args.output or RESULTS / f"stream-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    harness.write_json(out, report)
    print(_table(report))
    print(f"\nJSON: {out}")
    return 0


def _table(report: dict) -> str:
    head = f"{'size':>6} {'run':<15} {'s/pair':>7} {'warm s':>7} {'ratio':>6} {'compiles':>8} {'compile s':>9}"
    lines = [head + f" {'HOTPANTS s':>10} {'× HP':>5}"]
    for size in report["sizes"]:
        for run in report["runs"]:
            s = report[run]["summary"][size]
            hp = report.get("hotpants", {}).get("per_pair_s", {}).get(size)  # measured on the first run's pairs
            ratio = s["per_pair_s"] / s["warm_s"] if s["warm_s"] else float("nan")
            hp_txt = f"{hp:>10.2f} {hp / s['per_pair_s']:>5.1f}" if hp else f"{'—':>10} {'—':>5}"
            lines.append(
                f"{size:>6} {run:<15} {s['per_pair_s']:>7.2f} {s['warm_s']:>7.2f} {ratio:>6.2f} {s['compiles']:>8d} "
                f"{s['compile_s']:>9.1f} {hp_txt}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
