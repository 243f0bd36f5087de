"""Where `jd.subtract`'s time and memory go: XLA op times mapped back to jaxdiff source lines.

    python benchmarks/profile.py --size 2048            # table on stdout, JSON in benchmarks/results/
    python benchmarks/profile.py --size 4096 --top 40
    python benchmarks/profile.py --size 1024 --batch 8   # subtract_batch over 8 different pairs vs single calls

One warm call of the fused subtraction (the benchmark pair of `run.py`) is traced with the JAX profiler
(a Perfetto trace); every XLA op in the trace is attributed to the innermost jaxdiff source lines of the
compiled HLO's stack frames and to the stage (`jax.named_scope`) it runs in, and op times are summed per line
and per stage. Op times are CPU time of XLA's thunks: ops on
different threads overlap, so they add up to more than the wall time, and an op's own internal threads (the
FFT library's) are not separate events. The compiled program's memory analysis (arguments, outputs, temporary
buffers) is reported too. With `--batch B`, `jd.batch.subtract_batch` over B different pairs (those of
`batch.py`) is profiled the same way beside the B pairs' single fused calls, per pair and per stage.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import harness
import jax
import run as bench  # the benchmark's pair and configuration (this folder is on sys.path as the script's)

STAGES = ("prepare", "select", "fit", "difference")  # the named scopes of jd.subtract's core


def _sections(hlo: str) -> dict:
    """The FileNames / FunctionNames / FileLocations / StackFrames tables of an HLO module's text."""
    out, current = {}, None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = out.setdefault(line, {})
        elif current is not None and re.match(r"^\d+ ", line):
            key, rest = line.split(" ", 1)
            current[int(key)] = rest
        elif current is not None and not line.strip():
            current = None
    return out


def source_lines(hlo: str) -> dict[str, str]:
    """HLO op name → 'file:function:line' of the innermost jaxdiff frames (two levels), from stack frames."""
    sec = _sections(hlo)
    files = {i: v.strip('"') for i, v in sec.get("FileNames", {}).items()}
    funcs = {i: v.strip('"') for i, v in sec.get("FunctionNames", {}).items()}
    locations = {}
    for i, v in sec.get("FileLocations", {}).items():
        d = dict(re.findall(r"(\w+)=(\w+)", v))
        locations[i] = (files[int(d["file_name_id"])], funcs[int(d["function_name_id"])], int(d["line"]))
    frames = {}
    for i, v in sec.get("StackFrames", {}).items():
        d = dict(re.findall(r"(\w+)=(\w+)", v))
        frames[i] = (int(d["file_location_id"]), int(d.get("parent_frame_id", 0)))

    def where(frame):
        chain, seen = [], set()
        while frame and frame not in seen:
            seen.add(frame)
            loc, frame = frames[frame]
            path, fn, line = locations[loc]
            if "/jaxdiff/" in path:
                chain.append(f"{path.split('/jaxdiff/')[-1]}:{fn}:{line}")
        return " < ".join(chain[:2]) or "(no jaxdiff frame)"

    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*stack_frame_id=(\d+)", line)
        if m:
            out[m.group(1)] = where(int(m.group(2)))
    return out


def stages(hlo: str) -> dict[str, str]:
    """HLO op name → the `jax.named_scope` stage of `jd.subtract` it belongs to (from the op_name metadata)."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
        if m:
            path = f"/{m.group(2)}/"
            found = [s for s in STAGES if f"/{s}/" in path or f"/vmap({s})/" in path]  # vmap wraps the scope
            out[m.group(1)] = found[0] if found else "(other)"
    return out


def _trace(compiled, args, hlo: str) -> dict:
    """One warm call of a compiled program, untraced (wall time), then traced: XLA op time by line and by stage."""
    lines, stage_of = source_lines(hlo), stages(hlo)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # as the task runs it
        jax.block_until_ready(compiled(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        wall = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp, create_perfetto_trace=True)
            jax.block_until_ready(compiled(*args))
            jax.profiler.stop_trace()
            trace = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]
            events = json.load(gzip.open(trace))["traceEvents"]
    per_line, per_stage = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and not name.startswith(("while", "call")):
            per_line[lines.get(name, "(unattributed)")] += e["dur"] / 1e3
            per_stage[stage_of.get(name, "(other)")] += e["dur"] / 1e3
    return {"wall_s": wall, "per_line": per_line, "per_stage": per_stage}


def _memory(compiled) -> dict:
    memory = compiled.memory_analysis()
    mib = 2.0**20
    return {
        "arguments": memory.argument_size_in_bytes / mib,
        "outputs": memory.output_size_in_bytes / mib,
        "temporaries": memory.temp_size_in_bytes / mib,
    }


def _single(jd, t, s, src, config, plan) -> tuple:
    """The fused subtraction of one pair compiled ahead of time: (compiled, flat array arguments, HLO text)."""
    import equinox as eqx

    dynamic, static = eqx.partition((t, s, src), eqx.is_array)
    fused = jax.jit(lambda d: eqx.filter(jd.subtract(*eqx.combine(d, static), config, plan), eqx.is_array))
    compiled = fused.lower(dynamic).compile()
    return compiled, (dynamic,), compiled.as_text()


def profile_single(args) -> dict:
    import jaxdiff as jd

    pair = bench._simulate(args.size, 1, args.n_stars or bench.SIM["n_stars"], bench.SIM["n_transients"])
    config = jd.SubtractConfig(**bench.CONFIG)
    t, s = pair.template, pair.science
    plan = jd.make_plan(t, s, pair.sources, config)
    compiled, call_args, hlo = _single(jd, t, s, pair.sources, config, plan)
    run = _trace(compiled, call_args, hlo)
    per_line, per_stage = run["per_line"], run["per_stage"]
    total = sum(per_line.values())
    report = {
        "size": args.size,
        "machine": harness.machine_info(),
        "wall_s": run["wall_s"],
        "op_ms_total": total,
        "op_ms_by_stage": dict(per_stage.most_common()),
        "op_ms_by_line": dict(per_line.most_common()),
        "memory_mib": _memory(compiled),
    }
    print(f"{args.size}²: wall {run['wall_s']:.3f} s (warm, untraced), XLA op time {total:.0f} ms over all threads")
    print("memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in report["memory_mib"].items()))
    print("by stage (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in per_stage.most_common()))
    for line, ms in per_line.most_common(args.top):
        print(f"{ms:8.1f} ms  {100 * ms / total:5.1f} %  {line}")
    return report


def profile_batch(args) -> dict:
    """`jd.batch.subtract_batch` over `--batch` different pairs against the same pairs as single calls (each its
    own plan, as a user calls them): op time by stage and by line for both, and the wall times."""
    import numpy as np
    from batch import distinct_pairs

    import jaxdiff as jd
    from jaxdiff.batch import plan_for_pairs, stack_pairs, subtract_batch

    config = jd.SubtractConfig(do_subtract_background=True)
    pairs, _ = distinct_pairs(args.size, args.batch, np.random.default_rng(args.seed))
    plan = plan_for_pairs(pairs, config)
    batch, _ = stack_pairs(pairs, config, plan)
    compiled = jax.jit(subtract_batch, static_argnames=("config", "plan")).lower(*batch, config=config, plan=plan)
    compiled = compiled.compile()
    batched = _trace(compiled, batch, compiled.as_text())
    singles = {"wall_s": 0.0, "per_line": collections.Counter(), "per_stage": collections.Counter()}
    for t, s, src in pairs:
        one = _single(jd, t, s, src, config, jd.make_plan(t, s, src, config))
        run = _trace(*one)
        singles["wall_s"] += run["wall_s"]
        singles["per_line"] += run["per_line"]
        singles["per_stage"] += run["per_stage"]
    n = len(pairs)
    stage_names = [k for k, _ in (batched["per_stage"] + singles["per_stage"]).most_common()]
    by_stage = {
        k: {"batch_ms_per_pair": batched["per_stage"][k] / n, "single_ms_per_pair": singles["per_stage"][k] / n}
        for k in stage_names
    }
    lines = batched["per_line"] + singles["per_line"]
    by_line = {
        k: {"batch_ms_per_pair": batched["per_line"][k] / n, "single_ms_per_pair": singles["per_line"][k] / n}
        for k, _ in lines.most_common()
    }
    report = {
        "size": args.size,
        "batch": n,
        "plan": repr(plan),
        "machine": harness.machine_info(),
        "wall_s_per_pair": {"batch": batched["wall_s"] / n, "single": singles["wall_s"] / n},
        "op_ms_per_pair": {
            "batch": sum(batched["per_stage"].values()) / n,
            "single": sum(singles["per_stage"].values()) / n,
        },
        "op_ms_per_pair_by_stage": by_stage,
        "op_ms_per_pair_by_line": by_line,
        "memory_mib_per_pair": {k: v / n for k, v in _memory(compiled).items()},
    }
    wall = report["wall_s_per_pair"]
    print(f"{args.size}², {n} different pairs, {plan}")
    print(f"wall per pair (warm, untraced): batch {wall['batch']:.3f} s, single calls {wall['single']:.3f} s")
    print(f"{'XLA op ms per pair':<40} {'batch':>8} {'single':>8}")
    for k, v in [("total", report["op_ms_per_pair"])] + list(by_stage.items()):
        v = {"batch_ms_per_pair": v["batch"], "single_ms_per_pair": v["single"]} if k == "total" else v
        print(f"{k:<40} {v['batch_ms_per_pair']:8.1f} {v['single_ms_per_pair']:8.1f}")
    print("largest differences by line (ms per pair, batch − single):")
    diffs = sorted(by_line.items(), key=lambda kv: -abs(kv[1]["batch_ms_per_pair"] - kv[1]["single_ms_per_pair"]))
    for line, v in diffs[: args.top]:
        delta = v["batch_ms_per_pair"] - v["single_ms_per_pair"]
        print(f"{delta:+8.1f}  ({v['batch_ms_per_pair']:7.1f} vs {v['single_ms_per_pair']:7.1f})  {line}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--n-stars", type=int, default=None, help="stars in the pair (default: as benchmarks/run.py)")
    p.add_argument("--batch", type=int, default=0, help="profile subtract_batch over this many different pairs")
    p.add_argument("--seed", type=int, default=5, help="of the batch's pairs (as benchmarks/batch.py)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    with jax.enable_x64(True):
        report = profile_batch(args) if args.batch else profile_single(args)
    name = f"profile-batch{args.batch}-{args.size}.json" if args.batch else f"profile-{args.size}.json"
    output = args.output or Path(__file__).parent / "results" / name
    harness.write_json(output, report)
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
