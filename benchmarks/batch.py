"""Batched subtraction on one device: per-pair time, compile time, device memory and quality by batch size.

Each size gets `--distinct` simulated pairs with different PSFs (template σ 1.6–2.4 px, science 10–30 % wider) and
star counts (200–600); a batch of B pairs cycles through them. One plan serves all pairs (`jd.batch.plan_for_pairs`;
batches are stacked with `jd.batch.stack_pairs`). For every (size, B) `jd.batch.subtract_batch` is compiled ahead of
time (compile seconds and XLA's memory analysis: arguments + outputs + temporaries, per pair), then run `--repeats`
times (median wall time per pair). Quality of pair 0 (noise and star-residual ratios against the simulation truth) and
its largest deviation from a single `jd.subtract` call, in units of the difference's noise, are recorded once per
size. With `--singles`, each distinct pair is also run through `jd.subtract` on its own (warm, its own plan) and every
batch row gets `per_pair_vs_single`, its per-pair time over the single calls' mean. Every result is appended to the
JSON as soon as it is measured, so a run stopped early keeps what it finished. BLAS runs on one thread (as in the
task and `run_many`; on CPU its worker threads otherwise spin on the cores XLA uses).

    python benchmarks/batch.py --sizes 2048 4096 --batch-sizes 1 4 8 16 --output results/batch-gpu.json
    python benchmarks/batch.py --sizes 256 --batch-sizes 1 2 --distinct 2    # smoke run on CPU
    python benchmarks/batch.py --sizes 1024 --batch-sizes 8 --distinct 8 --singles   # CPU: batch vs 8 single calls
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import harness
import numpy as np
import run as bench

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(do_subtract_background=True)
BORDER = 20


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--distinct", type=int, default=4, help="distinct pairs per size (a batch cycles through them)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--budget", type=float, default=float("inf"), help="stop starting new runs after this many s")
    p.add_argument("--singles", action="store_true", help="also time one `jd.subtract` call per distinct pair")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def distinct_pairs(size: int, n: int, rng) -> tuple[list, list]:
    """`n` simulated pairs of one size with different PSFs (template σ 1.6–2.4 px, science 10–30 % wider) and star
    counts (200–600): ([(template, science, sources)], [truth])."""
    import jaxdiff as jd

    pairs, truths = [], []
    for _ in range(n):
        st = float(rng.uniform(1.6, 2.4))
        p = jd.sim.simulate_pair(
            (size, size),
            seed=int(rng.integers(1 << 30)),
            n_stars=int(rng.integers(200, 601)),
            template_sigma=st,
            science_sigma=st * float(rng.uniform(1.1, 1.3)),
            sigma_variation=0.1,
            sky_gradient=0.1,
            n_transients=20,
        )
        pairs.append((p.template, p.science, p.sources))
        truths.append(p.truth)
    return pairs, truths


def _single_calls(jd, pairs, config, repeats: int) -> dict:
    """Warm `jd.subtract` calls on each pair (its own plan, as a user calls it): the median over `repeats` per
    pair after one call that compiles, averaged over the pairs."""
    import jax

    first, warm = [], []
    for t, s, src in pairs:
        t0 = time.perf_counter()
        jax.block_until_ready(jd.subtract(t, s, src, config).difference.image)
        first.append(time.perf_counter() - t0)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(jd.subtract(t, s, src, config).difference.image)
            times.append(time.perf_counter() - t0)
        warm.append(statistics.median(times))
    return {"per_pair_s": statistics.fmean(warm), "first_call_s": first, "warm_s": warm}


def main(argv=None) -> int:
    from threadpoolctl import threadpool_limits

    # BLAS (jaxlib's LAPACK calls) on one thread, as the task and run_many run: both sides measured alike
    with threadpool_limits(1, user_api="blas"):
        return _main(_parse(argv))


def _main(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)

    import jaxdiff as jd
    from jaxdiff.batch import plan_for_pairs, stack_pairs, subtract_batch

    batched_jit = jax.jit(subtract_batch, static_argnames=("config", "plan"))

    t_start = time.perf_counter()
    out = args.output or RESULTS / f"batch-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": harness.machine_info(),
        "config": CONFIG,
        "runs": [],
        "quality": [],
        "singles": [],
    }
    save = lambda: harness.write_json(out, report)
    config = jd.SubtractConfig(**CONFIG)
    rng = np.random.default_rng(args.seed)
    for size in args.sizes:
        pairs, truths = distinct_pairs(size, args.distinct, rng)
        plan = plan_for_pairs(pairs, config)
        print(f"[batch] {size}²: plan {plan}", file=sys.stderr, flush=True)
        single = None
        if args.singles:
            single = _single_calls(jd, pairs, config, args.repeats)
            report["singles"].append({"size": size, **single})
            save()
            print(f"[batch] {size}² single calls: {single}", file=sys.stderr, flush=True)
        for b in args.batch_sizes:
            if time.perf_counter() - t_start > args.budget:
                report["stopped"] = f"budget of {args.budget} s reached before {size}² B={b}"
                save()
                return 0
            batch, _ = stack_pairs([pairs[i % args.distinct] for i in range(b)], config, plan)
            batch = jax.device_put(batch)
            t0 = time.perf_counter()
            compiled = batched_jit.lower(*batch, config=config, plan=plan).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            device_bytes = None
            if mem is not None:
                device_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            times = []
            result = None
            for _ in range(args.repeats + 1):
                del result
                t0 = time.perf_counter()
                result = jax.block_until_ready(compiled(*batch))
                times.append(time.perf_counter() - t0)
            status = np.asarray(result.metadata["status"])
            run = {
                "size": size,
                "batch": b,
                "compile_s": compile_s,
                "first_s": times[0],
                "per_pair_s": statistics.median(times[1:]) / b,
                "device_bytes": device_bytes,
                "device_gib_per_pair": None if device_bytes is None else device_bytes / b / 2**30,
                "n_failed": int(np.sum(status != 0)),
                "kernel_size": plan.k,
            }
            if single is not None:
                run["per_pair_vs_single"] = run["per_pair_s"] / single["per_pair_s"]
            report["runs"].append(run)
            save()
            print(f"[batch] {run}", file=sys.stderr, flush=True)
            if b == max(args.batch_sizes) or b == args.batch_sizes[-1]:
                one = jax.tree.map(lambda a: a[0], result)
                single_result = jd.subtract(*pairs[0], config, plan=plan)
                d = np.asarray(one.difference.image, np.float64)
                noise = float(np.nanstd(np.asarray(single_result.difference.image)[BORDER:-BORDER, BORDER:-BORDER]))
                dev = float(np.nanmax(np.abs(d - np.asarray(single_result.difference.image, np.float64)))) / noise
                diff = one.difference
                bad = (np.asarray(diff.mask) & bench._bad_bits(diff.mask_planes)) != 0
                q = harness.quality(
                    d,
                    np.asarray(diff.variance),
                    bad,
                    np.asarray(diff.psf.image(), np.float64),
                    truths[0],
                    (0, 0),
                    BORDER,
                )
                report["quality"].append({"size": size, "max_dev_vs_single_in_noise": dev, **q})
                save()
            del batch, result, compiled
    print(json.dumps(harness.to_jsonable(report["runs"]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
