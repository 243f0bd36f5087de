"""Where `jd.subtract`'s time and memory go: XLA op times mapped back to jaxdiff source lines.

    python benchmarks/profile.py --size 2048            # table on stdout, JSON in benchmarks/results/
    python benchmarks/profile.py --size 4096 --top 40

One warm call of the fused subtraction (the benchmark pair of `run.py`) is traced with the JAX profiler
(a Perfetto trace); every XLA op in the trace is attributed to the innermost jaxdiff source lines of the
compiled HLO's stack frames and to the stage (`jax.named_scope`) it runs in, and op times are summed per line
and per stage. Op times are CPU time of XLA's thunks: ops on
different threads overlap, so they add up to more than the wall time, and an op's own internal threads (the
FFT library's) are not separate events. The compiled program's memory analysis (arguments, outputs, temporary
buffers) is reported too.
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
            found = [s for s in STAGES if f"/{s}/" in f"/{m.group(2)}/"]
            out[m.group(1)] = found[0] if found else "(other)"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)

    import equinox as eqx
    from threadpoolctl import threadpool_limits

    import jaxdiff as jd

    pair = bench._simulate(args.size, 1, bench.SIM["n_stars"], bench.SIM["n_transients"])
    config = jd.SubtractConfig(**bench.CONFIG)
    with jax.enable_x64(True):
        t, s = pair.template, pair.science
        plan = jd.make_plan(t, s, pair.sources, config)
        fused = eqx.filter_jit(lambda t, s, src: jd.subtract(t, s, src, config, plan))
        compiled = fused.lower(t, s, pair.sources).compile()
        hlo = compiled.compiled.as_text()  # equinox's wrapper holds the jax.stages.Compiled
        lines, stage_of = source_lines(hlo), stages(hlo)
        memory = compiled.compiled.memory_analysis()
        with threadpool_limits(1, user_api="blas"):  # as the task runs it (jaxdiff._runtime)
            jax.block_until_ready(compiled(t, s, pair.sources))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(t, s, pair.sources))
            wall = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                jax.profiler.start_trace(tmp, create_perfetto_trace=True)
                jax.block_until_ready(compiled(t, s, pair.sources))
                jax.profiler.stop_trace()
                trace = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]
                events = json.load(gzip.open(trace))["traceEvents"]
    per_line, per_stage = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and not name.startswith(("while", "call")):
            per_line[lines.get(name, "(unattributed)")] += e["dur"] / 1e3
            per_stage[stage_of.get(name, "(other)")] += e["dur"] / 1e3
    total = sum(per_line.values())
    mib = 2.0**20
    report = {
        "size": args.size,
        "machine": harness.machine_info(),
        "wall_s": wall,
        "op_ms_total": total,
        "op_ms_by_stage": dict(per_stage.most_common()),
        "op_ms_by_line": dict(per_line.most_common()),
        "memory_mib": {
            "arguments": memory.argument_size_in_bytes / mib,
            "outputs": memory.output_size_in_bytes / mib,
            "temporaries": memory.temp_size_in_bytes / mib,
        },
    }
    print(f"{args.size}²: wall {wall:.3f} s (warm, untraced), XLA op time {total:.0f} ms over all threads")
    print("memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in report["memory_mib"].items()))
    print("by stage (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in per_stage.most_common()))
    for line, ms in per_line.most_common(args.top):
        print(f"{ms:8.1f} ms  {100 * ms / total:5.1f} %  {line}")
    output = args.output or Path(__file__).parent / "results" / f"profile-{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(harness.to_jsonable(report), indent=1))
    print(f"JSON: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
