"""Peer subtraction codes run on the same simulated pairs: SFFT, OIS (PyPI) and HOTPANTS (binary on PATH).

Each peer is a function `(inputs, workdir, threads) -> PeerOutput` over plain numpy arrays, run by a worker
process under a time limit (see `run.py`). `available(name)` says whether a peer can run here and, when
not, why. All peers convolve the template (as jaxdiff's default convolveTemplate mode), so their difference
images are science − K∗template in science flux units with the science PSF.
"""

import dataclasses
import importlib.util
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from harness import disk_map
from scipy import interpolate

NAMES = ("sfft", "ois", "hotpants")
_MESH = 64  # sky mesh (pixels), as SExtractor's default BACK_SIZE
_OIS_TILE = 512  # OIS fits one constant kernel per tile of about this side


@dataclasses.dataclass
class PeerOutput:
    """A peer's difference image on the science box.

    Attributes:
        difference: science − matched template (science flux units).
        variance: the peer's variance plane, or None when it has none (the harness then uses the naive
            science + template variance).
        bad: pixels the peer could not compute (NaN, zero-padded borders), or None.
        note: how the peer was configured, for the report.
    """

    difference: np.ndarray
    variance: np.ndarray | None
    bad: np.ndarray | None
    note: str


def available(name: str) -> tuple[bool, str]:
    """Whether peer `name` can run here; the message says what is missing when it cannot."""
    if name == "hotpants":
        path = shutil.which("hotpants")
        return (path is not None, path or "no `hotpants` binary on PATH")
    module = {"sfft": "sfft", "ois": "ois"}[name]
    if importlib.util.find_spec(module) is None:
        return False, f"`{module}` is not installed (pip install --no-build-isolation -e '.[peers]')"
    return True, module


HOTPANTS_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "hotpants"
HOTPANTS_BIN = Path(__file__).resolve().parent / ".bin"


def ensure_hotpants() -> tuple[bool, str]:
    """Put a `hotpants` binary on PATH: the one there, else one built from the team's copy of the HOTPANTS
    sources into `benchmarks/.bin` (git-ignored; the build needs gcc and libcfitsio-dev)."""
    if shutil.which("hotpants") is None and (HOTPANTS_SOURCE / "build.sh").exists():
        if not (HOTPANTS_BIN / "hotpants").exists():
            subprocess.run(["bash", str(HOTPANTS_SOURCE / "build.sh"), str(HOTPANTS_BIN)], check=False)
        if (HOTPANTS_BIN / "hotpants").exists():
            os.environ["PATH"] = f"{HOTPANTS_BIN}{os.pathsep}{os.environ['PATH']}"
    return available("hotpants")


def sky(image: np.ndarray, mask: np.ndarray, detected_bit: int) -> np.ndarray:
    """A smooth sky: 3σ-clipped medians of 64-px meshes (DETECTED pixels left out), interpolated linearly.

    Arguments:
        image: (ny, nx) image.
        mask: its integer mask.
        detected_bit: bit number of the DETECTED plane.

    Returns:
        The sky image, shaped like `image`.
    """
    ny, nx = image.shape
    my, mx = max(ny // _MESH, 1), max(nx // _MESH, 1)
    ey, ex = np.linspace(0, ny, my + 1).astype(int), np.linspace(0, nx, mx + 1).astype(int)
    values = np.zeros((my, mx))
    free = (mask & (1 << detected_bit)) == 0
    for i in range(my):
        for j in range(mx):
            block = image[ey[i] : ey[i + 1], ex[j] : ex[j + 1]][free[ey[i] : ey[i + 1], ex[j] : ex[j + 1]]]
            block = block[np.isfinite(block)]
            if block.size == 0:
                values[i, j] = np.nan
                continue
            med, mad = np.median(block), np.median(np.abs(block - np.median(block)))
            keep = np.abs(block - med) < 3 * 1.4826 * mad if mad > 0 else np.ones(block.size, bool)
            values[i, j] = np.median(block[keep])
    values = np.where(np.isfinite(values), values, np.nanmedian(values))
    cy, cx = 0.5 * (ey[:-1] + ey[1:]) - 0.5, 0.5 * (ex[:-1] + ex[1:]) - 0.5
    if my == 1 or mx == 1:
        return np.full(image.shape, float(np.median(values)))
    f = interpolate.RegularGridInterpolator((cy, cx), values, bounds_error=False, fill_value=None)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    return f((yy, xx))


def _write_fits(path: Path, data: np.ndarray) -> None:
    from astropy.io import fits

    fits.PrimaryHDU(np.ascontiguousarray(data)).writeto(path, overwrite=True)


def run_sfft(inputs: dict, workdir: Path, threads: int) -> PeerOutput:
    """Sparse-flavour SFFT (Hu et al. 2022), Numpy backend, with our own preprocessing.

    SFFT's sparse flavour wants sky-subtracted images and "masked" copies that keep only isolated-star
    pixels. We subtract a mesh sky from each image and keep disks of radius 2.5 FWHM around the same
    kernel stars jaxdiff gets (SExtractor, which SFFT's automatic preprocessing calls, is not a PyPI
    package). Kernel half-width 2 × FWHM (SFFT's KerHWRatio), polynomial orders 2 (kernel) and 0 (background
    of sky-subtracted images), constant photometric ratio, template convolved.
    """
    from sfft.CustomizedPacket import Customized_Packet

    det = inputs["detected_bit"]
    sci = inputs["science_image"] - sky(inputs["science_image"], inputs["science_mask"], det)
    ref = inputs["template_image"] - sky(inputs["template_image"], inputs["template_mask"], det)
    fwhm = max(inputs["science_fwhm"], inputs["template_fwhm"])
    keep = disk_map(sci.shape, inputs["sources_x"], inputs["sources_y"], 2.5 * fwhm)
    paths = {name: workdir / f"sfft_{name}.fits" for name in ("ref", "sci", "mref", "msci")}
    for name, data in (("ref", ref), ("sci", sci), ("mref", ref * keep), ("msci", sci * keep)):
        _write_fits(paths[name], data)
    half_width = int(math.ceil(2.0 * fwhm))
    _, diff = Customized_Packet.CP(
        FITS_REF=str(paths["ref"]),
        FITS_SCI=str(paths["sci"]),
        FITS_mREF=str(paths["mref"]),
        FITS_mSCI=str(paths["msci"]),
        ForceConv="REF",
        GKerHW=half_width,
        KerPolyOrder=2,
        BGPolyOrder=0,
        ConstPhotRatio=True,
        BACKEND_4SUBTRACT="Numpy",
        NUM_CPU_THREADS_4SUBTRACT=threads,
        NUMBA_CACHE=False,
        VERBOSE_LEVEL=0,
    )
    diff = np.asarray(diff).T  # SFFT works on transposed (x, y) arrays
    return PeerOutput(diff, None, ~np.isfinite(diff), f"sparse, KerHW {half_width}, kernel order 2, Numpy×{threads}")


def run_ois(inputs: dict, workdir: Path, threads: int) -> PeerOutput:
    """OIS (Beroiz): Bramich delta-function kernel, 11 × 11, background order 2, on a grid of ~512² tiles.

    OIS holds one full-tile image per kernel pixel in memory, so whole-field fits at 4096² would need
    ~16 GB; the tile grid (OIS's `gridshape`) also lets the kernel vary over the field.
    """
    del workdir, threads
    import ois

    sci = inputs["science_image"].astype(np.float64)
    ref = inputs["template_image"].astype(np.float64)
    grid = (max(sci.shape[0] // _OIS_TILE, 1), max(sci.shape[1] // _OIS_TILE, 1))
    diff, _, _, _ = ois.optimal_system(sci, ref, kernelshape=(11, 11), bkgdegree=2, method="Bramich", gridshape=grid)
    diff = np.asarray(diff)
    bad = np.zeros(diff.shape, bool)
    bad[:5], bad[-5:], bad[:, :5], bad[:, -5:] = True, True, True, True  # zero-padded convolution
    return PeerOutput(diff, None, bad, f"Bramich 11×11, bkg order 2, grid {grid[0]}×{grid[1]}")


def run_hotpants(inputs: dict, workdir: Path, threads: int) -> PeerOutput:
    """HOTPANTS (Becker 2015) with its default Alard–Lupton basis, kernel and background order 2.

    The kernel half-width is 2.5 FWHM of the wider PSF; the noise image (`-oni`) gives the variance.
    """
    del threads
    sci_path, tmpl_path = workdir / "hp_sci.fits", workdir / "hp_tmpl.fits"
    out_path, noise_path = workdir / "hp_diff.fits", workdir / "hp_noise.fits"
    _write_fits(sci_path, inputs["science_image"].astype(np.float32))
    _write_fits(tmpl_path, inputs["template_image"].astype(np.float32))
    fwhm = max(inputs["science_fwhm"], inputs["template_fwhm"])
    low = float(min(inputs["science_image"].min(), inputs["template_image"].min())) - 1.0
    cmd = [
        "hotpants",
        *("-inim", str(sci_path), "-tmplim", str(tmpl_path), "-outim", str(out_path)),
        *("-oni", str(noise_path), "-c", "t", "-n", "i"),
        *("-tl", str(low), "-il", str(low), "-tu", "1e30", "-iu", "1e30"),
        *("-tg", str(inputs["gain"]), "-ig", str(inputs["gain"])),
        *("-tr", str(inputs["read_noise"]), "-ir", str(inputs["read_noise"])),
        *("-r", str(int(math.ceil(2.5 * fwhm))), "-rss", str(int(math.ceil(3.5 * fwhm)))),
        *("-ko", "2", "-bgo", "2"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from astropy.io import fits

    diff = fits.getdata(out_path).astype(np.float64)
    noise = fits.getdata(noise_path).astype(np.float64)
    bad = ~np.isfinite(diff) | ~(noise > 0)
    return PeerOutput(diff, noise**2, bad, f"-r {int(math.ceil(2.5 * fwhm))} -ko 2 -bgo 2")


RUNNERS = {"sfft": run_sfft, "ois": run_ois, "hotpants": run_hotpants}
