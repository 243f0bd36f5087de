"""jaxdiff.datasets offline: the local mirror in place, and real pooch downloads from a 127.0.0.1 server or file://."""

import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxdiff import datasets
from tests.utils import REAL_DATA

needs_mirror = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="real data mirror (../shared/data/real) not present")

SMALL = ["sfft_decam_decorr/input/FinalMatchKernel.fits", "sfft_decam_decorr/input/DEC-OBS18b.MatchKernel.fits"]
SFFT = "https://raw.githubusercontent.com/thomasvrussell/sfft/fa820e8b05ed374013b06bb32a53fa0ec0a6e753/test/"


def test_registry_lists_both_sets_with_original_addresses():
    reg = datasets.registry()
    assert len(datasets.files("decam")) == 24 and len(datasets.files("jwst")) == 8
    assert sorted(datasets.files("decam") + datasets.files("jwst")) == sorted(reg)
    for path, (digest, url) in reg.items():
        assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
        assert url.startswith(SFFT) and url.rsplit("/", 1)[1] == path.rsplit("/", 1)[1]
    with pytest.raises(KeyError, match="unknown data set 'hst'"):
        datasets.files("hst")
    with pytest.raises(KeyError, match="not a jaxdiff data file"):
        datasets.fetch("sfft_decam_decorr/input/nothing.fits")


@needs_mirror
def test_registry_hashes_match_every_mirrored_file():
    on_disk = sorted(str(p.relative_to(REAL_DATA)) for p in REAL_DATA.rglob("*.fits"))
    assert on_disk == sorted(datasets.registry())
    for path, (digest, _) in datasets.registry().items():
        assert hashlib.sha256((REAL_DATA / path).read_bytes()).hexdigest() == digest.split(":")[1], path


@needs_mirror
def test_local_mirror_is_read_in_place(monkeypatch, tmp_path):
    monkeypatch.setenv(datasets.ENV_MIRROR, str(REAL_DATA))
    monkeypatch.setenv(datasets.ENV_CACHE, str(tmp_path / "cache"))
    assert datasets.fetch(SMALL[0]) == REAL_DATA / SMALL[0]
    assert datasets.fetch_dataset("decam") == REAL_DATA / "sfft_decam_decorr"
    template, science, sources = datasets.load_decam(science="DEC-OBS04e")
    assert sources is None and science.shape == template.shape == (256, 256)
    from astropy.io import fits

    raw = fits.getdata(REAL_DATA / "sfft_decam_decorr/input/DEC-OBS04e.mini.fits")
    np.testing.assert_array_equal(np.asarray(science.image), raw)
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_local_mirror_errors_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(datasets.ENV_MIRROR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing from the local mirror"):
        datasets.fetch(SMALL[0])
    bad = tmp_path / SMALL[0]
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    with pytest.raises(datasets.DataIntegrityError, match="registry expects"):
        datasets.fetch(SMALL[0])


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        del args


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A mirror with the two small files and a corrupted copy of a third, served on 127.0.0.1."""
    root = tmp_path / "mirror"
    for p in SMALL:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REAL_DATA / p, root / p)
    corrupt = "sfft_decam_decorr/input/DEC-OBS04b.MatchKernel.fits"
    data = bytearray((REAL_DATA / corrupt).read_bytes())
    data[-1] ^= 0xFF
    (root / corrupt).write_bytes(bytes(data))

    handler = type("Handler", (_Handler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(datasets.ENV_CACHE, str(tmp_path / "cache"))
    yield f"http://127.0.0.1:{server.server_address[1]}", handler, corrupt
    server.shutdown()
    server.server_close()
    thread.join()


@needs_mirror
def test_http_mirror_downloads_checks_and_caches(served, monkeypatch, tmp_path):
    url, handler, corrupt = served
    monkeypatch.setenv(datasets.ENV_MIRROR, url + "/")
    local = datasets.fetch(SMALL[0])
    assert local == tmp_path / "cache" / SMALL[0]
    assert local.read_bytes() == (REAL_DATA / SMALL[0]).read_bytes()
    assert handler.requests == ["/" + SMALL[0]]
    assert datasets.fetch(SMALL[0]) == local and len(handler.requests) == 1  # cached: no second request

    local.write_bytes(b"damaged")  # a damaged cache entry is downloaded again
    assert datasets.fetch(SMALL[0]).read_bytes() == (REAL_DATA / SMALL[0]).read_bytes()
    assert len(handler.requests) == 2

    with pytest.raises(datasets.DataIntegrityError, match="corrupted"):
        datasets.fetch(corrupt)
    assert not (tmp_path / "cache" / corrupt).exists()  # the bad download was not kept


@needs_mirror
def test_file_url_mirror_downloads_into_the_cache(served, monkeypatch, tmp_path):
    _, _, corrupt = served
    monkeypatch.setenv(datasets.ENV_MIRROR, (tmp_path / "mirror").as_uri())
    local = datasets.fetch(SMALL[1])
    assert local == tmp_path / "cache" / SMALL[1]
    assert local.read_bytes() == (REAL_DATA / SMALL[1]).read_bytes()
    with pytest.raises(datasets.DataIntegrityError):
        datasets.fetch(corrupt)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(datasets.ENV_CACHE, str(tmp_path))
    assert datasets.cache_dir() == Path(tmp_path)
