"""A/B timing of two versions of jaxdiff in one process, their warm calls alternating on the same pair.

    python benchmarks/ab.py --base HEAD~1                      # the working tree against HEAD~1, 2048²
    python benchmarks/ab.py --base main --candidate HEAD --size 4096 --calls 8
    python benchmarks/ab.py --base HEAD --api task             # AlardLuptonSubtract.run instead of jd.subtract
    python benchmarks/ab.py --base HEAD --candidate HEAD --api-b task   # the task against the fused call

On a shared or busy machine the same warm call varies by ±20 % between processes, which hides changes of a few
per cent. Here both versions run in one process on the benchmark pair of `run.py`: their calls alternate (A B,
then B A, ...), so both meet the same conditions. With `--block N` they alternate in blocks of N calls, so each
version is mostly timed after its own calls, as in a process that runs only it (the task's host work is slower
right after a `jd.subtract` call). Each version's `jaxdiff/` is taken from git (`git archive`; the candidate may
also be the working tree) and imported under its own package name, which works because the package imports
itself only relatively. The pair is simulated once with the installed jaxdiff and rebuilt from its arrays with
each version's classes. jd.subtract runs with x64 enabled, as the task does. Prints medians, first quartiles and
minima, and writes JSON to `benchmarks/results/ab-<time>.json`.
"""

import argparse
import datetime
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import run as bench  # the benchmark pair and configuration

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def _export(rev: str, dest: Path, name: str) -> None:
    """The `jaxdiff/` of git revision `rev` (or of the working tree for "WORKTREE") as package `name`."""
    target = dest / name
    if rev == "WORKTREE":
        subprocess.run(["cp", "-r", str(ROOT / "jaxdiff"), str(target)], check=True)
        return
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "jaxdiff"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    (dest / "jaxdiff").rename(target)


def _psf(jd, psf):
    if psf is None:
        return None
    if type(psf).__name__ == "GridPsf":
        return jd.GridPsf(psf.images, psf.box)
    return jd.ImagePsf(psf.image())


def _call(jd, pair, api: str):
    """A zero-argument warm call of version `jd` on the pair."""
    import jax

    def exposure(e):
        return jd.Exposure(
            e.image, e.variance, e.mask, _psf(jd, e.psf), e.xy0, e.photo_calib, mask_planes=e.mask_planes
        )

    template, science = exposure(pair.template), exposure(pair.science)
    sources = jd.Sources(pair.sources.x, pair.sources.y, pair.sources.flux)
    config = jd.SubtractConfig(**bench.CONFIG)
    if api == "task":
        task = jd.AlardLuptonSubtract(config=config)
        return lambda: task.run(template, science, sources)

    def fused():
        with jax.enable_x64(True):
            return jax.block_until_ready(jd.subtract(template, science, sources, config))

    return fused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision of version A")
    p.add_argument("--candidate", default="WORKTREE", help="git revision of version B (default: the working tree)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--calls", type=int, default=20, help="warm calls per version")
    p.add_argument("--api", choices=("subtract", "task"), default="subtract")
    p.add_argument("--api-b", choices=("subtract", "task"), default=None, help="version B's API (default: --api)")
    p.add_argument("--seed", type=int, default=1, help="of the pair (run.py's default)")
    p.add_argument("--n-stars", type=int, default=None, help=f"stars in the pair (run.py's {bench.SIM['n_stars']})")
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive calls of one version before switching (default 1: A B B A ...); a block of a few calls "
        "measures each version after its own calls, as a process running only it would",
    )
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    api_b = args.api_b or args.api

    with tempfile.TemporaryDirectory() as tmp:
        revs = {"jaxdiff_ab_a": args.base, "jaxdiff_ab_b": args.candidate}
        apis = {"jaxdiff_ab_a": args.api, "jaxdiff_ab_b": api_b}
        both = args.api != api_b or args.base == args.candidate  # name the API too where the revisions alone don't
        labels = {name: f"{rev} ({apis[name]})" if both else rev for name, rev in revs.items()}
        for name, rev in revs.items():
            _export(rev, Path(tmp), name)
        sys.path.insert(0, tmp)
        versions = {name: importlib.import_module(name) for name in labels}
        n_stars = args.n_stars or bench.SIM["n_stars"]
        pair = bench._simulate(args.size, args.seed, n_stars, bench.SIM["n_transients"])
        calls = {}
        for name, jd in versions.items():
            calls[name] = _call(jd, pair, apis[name])
            t0 = time.perf_counter()
            calls[name]()
            print(f"[ab] {labels[name]}: first call {time.perf_counter() - t0:.1f} s", flush=True)
            calls[name]()
        times = {name: [] for name in calls}
        block = max(1, args.block)
        for i in range(-(-args.calls // block)):
            order = list(calls) if i % 2 == 0 else list(reversed(calls))
            for name in order:
                for _ in range(min(block, args.calls - i * block)):
                    t0 = time.perf_counter()
                    calls[name]()
                    times[name].append(time.perf_counter() - t0)

    summary = {}
    for name, ts in times.items():
        ts = sorted(ts)
        summary[labels[name]] = {"median_s": statistics.median(ts), "q25_s": ts[len(ts) // 4], "min_s": ts[0]}
    a, b = (summary[labels[n]] for n in labels)
    api_text = args.api if api_b == args.api else f"A {args.api}, B {api_b}"
    how = "alternating" if args.block <= 1 else f"alternating in blocks of {args.block}"
    print(f"{args.size}², {api_text}, {args.calls} warm calls each, {how}")
    for rev, s in summary.items():
        print(f"  {rev:<20} median {s['median_s']:.3f} s   q25 {s['q25_s']:.3f} s   min {s['min_s']:.3f} s")
    print(f"  B / A: median {b['median_s'] / a['median_s']:.3f}, q25 {b['q25_s'] / a['q25_s']:.3f}")
    report = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": harness.machine_info(),
        "size": args.size,
        "api": args.api,
        "api_b": api_b,
        "calls": args.calls,
        "block": args.block,
        "base": args.base,
        "candidate": args.candidate,
        "summary": summary,
        "times_s": {labels[n]: ts for n, ts in times.items()},
    }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.output or RESULTS / f"ab-{stamp}.json"
    harness.write_json(out, report)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
