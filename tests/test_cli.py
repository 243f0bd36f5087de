"""The `jaxdiff` command line: the real console script on FITS files, and one-line errors for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

import jaxdiff as jd
from jaxdiff._cli import main
from jaxdiff._mask import plane_bit
from jaxdiff.sim import simulate_pair

REPO = Path(__file__).resolve().parents[1]
FLUX_SCALE = 1.1


def _run(*args, cwd):
    """`python -m jaxdiff ARGS` in a fresh interpreter, with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "jaxdiff", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_one_error_line(stderr: str):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("jaxdiff: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 256² simulated pair as FITS, its kernel stars as CSV, and an assortment of bad inputs."""
    d = tmp_path_factory.mktemp("cli")
    pair = simulate_pair((256, 256), seed=7, n_stars=120, n_transients=4, flux_scale=FLUX_SCALE)
    science, template = pair.science, pair.template
    jd.write_exposure(d / "science.fits", science)
    jd.write_exposure(d / "template.fits", template)
    x, y = np.asarray(pair.sources.x), np.asarray(pair.sources.y)
    Table({"x": x, "y": y}).write(d / "sources.csv")
    Table({"slot_Centroid_x": x, "slot_Centroid_y": y}).write(d / "sources.fits")
    Table({"x": x[:0], "y": y[:0]}).write(d / "empty.csv")
    Table({"a": x, "b": y}).write(d / "no_columns.csv")
    Table({"x": x + 1000.0, "y": y}).write(d / "outside.csv")
    (d / "text.fits").write_text("this is not a FITS file\n")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 4)

    def variant(name, **changes):
        fields = {
            "image": science.image,
            "variance": science.variance,
            "mask": science.mask,
            "psf": science.psf,
            "xy0": science.xy0,
        }
        fields.update(changes)
        jd.write_exposure(d / name, jd.Exposure(**fields, mask_planes=science.mask_planes))

    variant("nan.fits", image=np.full(science.shape, np.nan, np.float32))
    variant("small.fits", image=science.image[:200, :200], variance=science.variance[:200, :200], mask=None)
    no_data = np.asarray(template.mask) | (1 << plane_bit(template.mask_planes, "NO_DATA"))
    variant("no_data.fits", mask=no_data)
    return d


def test_subtract_writes_difference_matched_template_and_plot(files, tmp_path):
    out = tmp_path / "diff.fits"
    proc = _run(
        "subtract",
        str(files / "science.fits"),
        str(files / "template.fits"),
        "-o",
        str(out),
        "--sources",
        str(files / "sources.csv"),
        "--plot",
        "diag.png",
        "--matched-template",
        "matched.fits",
        "--subtract-background",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    science = jd.read_exposure(files / "science.fits")
    diff = jd.read_exposure(out)
    assert diff.shape == science.shape
    assert np.array_equal(np.asarray(diff.xy0), np.asarray(science.xy0))
    image, variance = np.asarray(diff.image), np.asarray(diff.variance)
    good = np.isfinite(image) & (variance > 0)
    assert good.mean() > 0.8
    z = image[good] / np.sqrt(variance[good])
    q25, q75 = np.percentile(z, [25, 75])
    assert abs(np.median(z)) < 0.1 and 0.8 < 0.7413 * (q75 - q25) < 1.2
    matched = jd.read_exposure(tmp_path / "matched.fits")
    assert matched.shape == science.shape
    assert (tmp_path / "diag.png").read_bytes()[:4] == b"\x89PNG"
    # the summary names the mode and a kernel sum near the simulated flux scale
    assert "convolveTemplate" in proc.stdout
    (line,) = [line for line in proc.stdout.splitlines() if "kernel sum" in line]
    assert abs(float(line.split()[-1]) - FLUX_SCALE) < 0.02
    assert sorted(os.listdir(tmp_path)) == ["diag.png", "diff.fits", "matched.fits"]


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["subtract", "missing.fits", "{d}/template.fits", "-o", "out.fits"], 1, "no such file"),
        (["subtract", "{d}/science.fits", "{d}/template.fits", "-o", "out.fits", "--mode", "bad"], 2, "mode"),
        (["subtract", "{d}/text.fits", "{d}/template.fits", "-o", "out.fits"], 1, "FITS"),
    ],
)
def test_console_script_fails_with_one_line(files, tmp_path, args, status, words):
    proc = _run(*(a.format(d=files) for a in args), cwd=tmp_path)
    assert proc.returncode == status
    assert words in _assert_one_error_line(proc.stderr)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "status", "words"),
    [
        (["S", "T", "--sources", "missing.csv"], 1, "no such file"),
        (["{d}/missing.fits", "T"], 1, "no such file"),
        (["{d}/text.fits", "T"], 1, "not a readable FITS"),
        (["S", "{d}/garbage.bin"], 1, "template"),
        (["{d}/nan.fits", "T"], 1, "no finite pixels"),
        (["S", "{d}/small.fits"], 1, "does not cover the science box"),
        (["S", "{d}/no_data.fits"], 1, "template covers 0.0%"),
        (["S", "T", "--sources", "{d}/empty.csv"], 1, "is empty"),
        (["S", "T", "--sources", "{d}/no_columns.csv"], 1, "no x column"),
        (["S", "T", "--sources", "{d}/outside.csv"], 1, "inside the science image"),
        (["S", "T", "--sources", "{d}/garbage.bin"], 1, "cannot read the source table"),
        (["S", "T", "--sources", "{d}/science.fits"], 1, "source table"),
        (["S", "T", "--solver", "newton"], 2, "--solver"),
        (["S", "T", "--plot", "diag.txt"], 2, "--plot"),
        (["S", "T", "--frobnicate"], 2, "unrecognized arguments"),
        (["S", "T", "-o", "{d}/no/such/dir/out.fits"], 1, "does not exist"),
        (["S", "T", "--plot", "{d}/no/such/dir/p.png"], 1, "does not exist"),
    ],
)
def test_bad_input_fails_with_one_line_and_no_output(files, tmp_path, capsys, args, status, words):
    sub = {"S": str(files / "science.fits"), "T": str(files / "template.fits")}
    argv = ["subtract"] + [sub.get(a, a.format(d=files)) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out.fits")]
    argv += ["--plot", str(tmp_path / "out.png")] if "--plot" not in argv else []
    assert main(argv) == status
    captured = capsys.readouterr()
    assert words in _assert_one_error_line(captured.err)
    assert captured.out == ""
    assert os.listdir(tmp_path) == []


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in _assert_one_error_line(capsys.readouterr().err)
    assert main(["subtract", "a.fits", "b.fits"]) == 2
    assert "-o/--output" in _assert_one_error_line(capsys.readouterr().err)
    assert main(["demo", "--size", "10"]) == 2
    assert "--size" in _assert_one_error_line(capsys.readouterr().err)
    assert main(["subtract", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--sources", "--mode", "--solver", "--no-decorrelate", "--plot", "--matched-template"):
        assert option in out


def test_demo_recovers_transients_and_writes_its_files(tmp_path, capsys):
    outdir = tmp_path / "demo"
    assert main(["demo", "--size", "256", "--seed", "3", "--outdir", str(outdir)]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(outdir)) == ["diagnostics.png", "difference.fits", "science.fits", "template.fits"]
    (line,) = [line for line in out.splitlines() if "recovered" in line]
    found, injected = (int(v) for v in line.split("recovered ")[1].split()[0].split("/"))
    assert injected == 5 and found >= 4
    ratio = float(line.split("PSF flux ")[1])
    assert 0.85 < ratio < 1.15
    (others,) = [line for line in out.splitlines() if "other detections" in line]
    assert int(others.split()[2]) <= 5  # padding of the detection list is no detection (was 977 at 1024²)
    for word in ("simulating", "subtracting", "writing", "kernel sum", "with compilation"):
        assert word in out
    diff = jd.read_exposure(outdir / "difference.fits")
    assert diff.shape == (256, 256)


@pytest.mark.slow  # 20 s on 2 cores; the task-level precompile test (test_programs.py) runs in CI
def test_precompile_compiles_the_other_kernel_sides(files, tmp_path):
    (tmp_path / "two.toml").write_text("kernel_size_buckets = [21, 35]\n")
    proc = _run(
        "subtract",
        str(files / "science.fits"),
        str(files / "template.fits"),
        "-o",
        "diff.fits",
        "--sources",
        str(files / "sources.csv"),
        "--config",
        "two.toml",
        "--precompile",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "diff.fits").exists()
    assert "kernel side 35 px:" in proc.stdout and "kernel side 21 px:" not in proc.stdout, proc.stdout
