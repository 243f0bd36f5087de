"""Public real image pairs, fetched on first use with `pooch` and checked against their SHA-256.

Two data sets, both copied byte for byte from the SFFT repository (github.com/thomasvrussell/sfft, MIT licence,
Hu et al. 2022, ApJ 936, 157) at commit `fa820e8b`:

- `"decam"`: DECam i-band 256² cut-outs of one field, five 2018 science and five 2016 reference exposures,
  registered by SWarp onto one grid, plus sfft's stacks and differences (7.4 MiB).
- `"jwst"`: JWST NIRCam F200W 900² stamps of Abell 2744 (GLASS June 2022 reference, UNCOVER November 2022 science)
  with their ERR maps, WebbPSF models and sfft's fitting mask (19 MiB).

Files are downloaded from their original public addresses into a cache directory and reused afterwards.

Environment variables:

- `JAXDIFF_DATA_DIR`: the cache directory (default: the user cache directory, e.g. `~/.cache/jaxdiff`).
- `JAXDIFF_DATA_MIRROR`: a mirror with the same layout (`sfft_decam_decorr/input/DEC-OBS04a.mini.fits`, ...),
  used instead of the original addresses. A local folder is read in place (no copy, no network); an `http://`,
  `https://` or `file://` address is downloaded from into the cache. Either way every file is checked against
  the registry's SHA-256.
"""

import os
import shutil
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path

DATASETS = {
    "decam": "sfft_decam_decorr",
    "jwst": "sfft_jwst_nircam_a2744",
}
"""Data set name → its top-level folder in the mirror layout."""

ENV_CACHE = "JAXDIFF_DATA_DIR"
ENV_MIRROR = "JAXDIFF_DATA_MIRROR"

_JWST_REF = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
_JWST_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"


_VERIFIED: set[tuple] = set()


class DataIntegrityError(ValueError):
    """A data file does not have the SHA-256 recorded in the registry (corrupted download or mirror)."""


def registry() -> dict[str, tuple[str, str]]:
    """Every known file: path in the mirror layout → (`"sha256:<hex>"`, original public address)."""
    text = resources.files("jaxdiff").joinpath("data/registry.txt").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, digest, url = line.split()
            out[name] = (digest, url)
    return out


def files(name: str) -> list[str]:
    """The registry paths of one data set (`"decam"` or `"jwst"`)."""
    folder = _folder(name)
    return [p for p in registry() if p.startswith(folder + "/")]


def cache_dir() -> Path:
    """Where downloaded files are kept: `$JAXDIFF_DATA_DIR`, else the user cache directory."""
    import pooch

    return Path(os.environ.get(ENV_CACHE) or pooch.os_cache("jaxdiff"))


def fetch(path: str) -> Path:
    """One data file, downloaded (or taken from the mirror) and checked; returns its local path.

    Arguments:
        path: a registry path, e.g. `"sfft_decam_decorr/input/DEC-OBS04a.mini.fits"` (see `files`).

    Returns:
        The local file. With `JAXDIFF_DATA_MIRROR` set to a folder this is the mirror's own file.

    Raises:
        KeyError: the path is not in the registry.
        FileNotFoundError: a local mirror lacks the file.
        DataIntegrityError: the file's SHA-256 differs from the registry's.
    """
    reg = registry()
    if path not in reg:
        raise KeyError(f"{path!r} is not a jaxdiff data file; known files: jaxdiff.datasets.files('decam' | 'jwst')")
    digest, url = reg[path]
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if mirror and "://" not in mirror:
        return _local(Path(mirror).expanduser() / path, digest)
    if mirror:
        url = mirror.rstrip("/") + "/" + urllib.parse.quote(path)
    return _download(path, digest, url)


def fetch_dataset(name: str) -> Path:
    """Every file of a data set; returns its folder (the layout of the mirror, e.g. `.../sfft_decam_decorr`)."""
    folder = _folder(name)
    return _fetch_all(folder, [p.removeprefix(folder + "/") for p in files(name)])


def load_decam(science: str = "DEC-OBS04a", template: str = "DEC-OBS18a", stacks: bool = False):
    """The DECam i-band pair as `(template, science, None)` `jd.Exposure`s (see `jaxdiff.real.load_decam`).

    Arguments:
        science: a science exposure, `DEC-OBS04a` … `DEC-OBS04e` (2018-08-04).
        template: a reference exposure, `DEC-OBS18a` … `DEC-OBS18e` (2016-08-18, better seeing).
        stacks: use sfft's median stacks of the five exposures of each epoch instead.

    Returns:
        (template, science, None): variance from the measured sky σ plus the Poisson term, Gaussian PSFs from the
        header FWHM; sources are left to the task's detector.
    """
    from .real import load_decam as _load

    folder = DATASETS["decam"]
    if stacks:
        needed = [f"reference_outputs/Stack-DEC-OBS{e}.fits" for e in ("18", "04")]
    else:
        needed = [f"input/{template}.mini.fits", f"input/{science}.mini.fits"]
    root = _fetch_all(folder, needed)
    return _load(root, science=science, template=template, stacks=stacks)


def load_jwst(box: tuple[int, int, int, int] | None = None, psf_size: int = 31, fit_mask_sources: bool = True):
    """The NIRCam F200W Abell 2744 pair as `(template, science, sources)` (see `jaxdiff.real.load_jwst`).

    Arguments:
        box: optional (x0, y0, nx, ny) cut-out of the 900² stamps.
        psf_size: odd size of the cropped WebbPSF models.
        fit_mask_sources: kernel stars from sfft's fitting mask; False leaves them to the task's detector.

    Returns:
        (template, science, sources) in MJy/sr with variance ERR².
    """
    from .real import load_jwst as _load

    needed = [f"input/{n}.fits" for n in (_JWST_REF, _JWST_SCI)]
    needed += [f"auxiliary/{n}.{kind}.fits" for n in (_JWST_REF, _JWST_SCI) for kind in ("noise", "WebbPSF")]
    needed += [f"auxiliary/{_JWST_SCI}.mask4sfft.fits"]
    root = _fetch_all(DATASETS["jwst"], needed)
    return _load(root, box=box, psf_size=psf_size, fit_mask_sources=fit_mask_sources)


def _folder(name: str) -> str:
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; use one of {sorted(DATASETS)}")
    return DATASETS[name]


def _fetch_all(folder: str, needed: list[str]) -> Path:
    """Fetch `folder/<each needed path>`; all land in one folder (mirror or cache), which is returned."""
    roots = {fetch(f"{folder}/{p}").parents[len(Path(p).parts) - 1] for p in needed}
    (root,) = roots
    return root


def _local(file: Path, digest: str) -> Path:
    """A file of a local mirror, used in place once its hash is checked (once per process and file version)."""
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing from the local mirror ${ENV_MIRROR}={os.environ.get(ENV_MIRROR)}; copy the data "
            f"set there or unset {ENV_MIRROR} to download from the original addresses"
        )
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, digest)
    if key not in _VERIFIED:
        _check(file, digest, f"the local mirror ${ENV_MIRROR}")
        _VERIFIED.add(key)
    return file


def _download(path: str, digest: str, url: str) -> Path:
    """Download `url` into the cache as `path` (unless a file with the right hash is there) and check it."""
    import pooch

    try:
        local = pooch.retrieve(
            url,
            known_hash=digest,
            fname=Path(path).name,
            path=cache_dir() / Path(path).parent,
            downloader=_copy_file if url.startswith("file://") else None,
            progressbar=False,
        )
    except ValueError as err:  # pooch's hash mismatch
        raise DataIntegrityError(
            f"{url} does not have the expected {digest}: the download or the mirror is corrupted ({err}). "
            f"Fix or remove the mirror (${ENV_MIRROR}) or retry later; nothing was kept in {cache_dir()}"
        ) from err
    return Path(local)


def _copy_file(url: str, output_file, pooch_obj, check_only: bool = False):
    """pooch downloader for `file://` addresses (pooch itself handles http, https, ftp, sftp and doi)."""
    del pooch_obj
    source = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if check_only:
        return source.is_file()
    if not source.is_file():
        raise FileNotFoundError(f"{url} does not exist; check ${ENV_MIRROR}")
    shutil.copyfile(source, output_file)
    return None


def _check(file: Path, digest: str, where: str) -> None:
    import pooch

    algorithm, expected = digest.split(":")
    actual = pooch.file_hash(str(file), alg=algorithm)
    if actual != expected:
        raise DataIntegrityError(
            f"{file} from {where} has {algorithm} {actual}, the registry expects {expected}: the file is "
            "corrupted or a different version; replace it with the original"
        )
