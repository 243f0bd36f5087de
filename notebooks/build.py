"""Write the example notebooks (unexecuted) with nbformat: `python notebooks/build.py`.

Sizes are small so that all three execute in a few minutes on a CPU (tests/test_notebooks.py runs them).
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import jax

jax.config.update("jax_enable_x64", True)  # notebooks are entry points: float64 for the normal equations
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import jaxdiff as jd"""

QUICKSTART = [
    new_markdown_cell("# jaxdiff quick start\n\nSimulate a template/science pair, subtract it, look at the pictures."),
    new_code_cell(SETUP),
    new_code_cell(
        """pair = jd.sim.simulate_pair((160, 160), seed=1, n_stars=60, n_transients=2, template_border=8,
                            flux_range=(2e3, 1e5), transient_flux_range=(1e4, 2e4))
task = jd.AlardLuptonSubtract()
result = task.run(pair.template, pair.science, pair.sources)
{k: result.metadata[k] for k in ("mode", "n_stamps_used", "kernel_sum", "residual_std", "template_coverage")}"""
    ),
    new_code_cell(
        """def show(ax, img, title, pct=99.5):
    v = np.nanpercentile(np.abs(img), pct)
    ax.imshow(img, origin="lower", cmap="gray", vmin=-v if img.min() < 0 else None, vmax=v)
    ax.set_title(title)

b = 8
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
show(axes[0], np.asarray(pair.science.image), "science")
show(axes[1], np.asarray(pair.template.image)[b:-b, b:-b], "template")
show(axes[2], np.asarray(result.difference.image), "difference")
axes[2].plot(pair.truth.transients_x - pair.science.xy0[0], pair.truth.transients_y - pair.science.xy0[1],
             "o", mfc="none", mec="r", ms=14)
axes[3].imshow(np.asarray(result.psf_matching_kernel.image()), origin="lower")
axes[3].set_title("matching kernel")
fig.tight_layout()"""
    ),
    new_code_cell(
        """d = np.asarray(result.difference.image) / np.sqrt(np.asarray(result.difference.variance))
print(f"difference / sigma: mean {np.mean(d):.3f}, std {np.std(d):.3f}")"""
    ),
]

FORWARD = [
    new_markdown_cell(
        "# Forward model: a transient's flux and position\n\n"
        "Inject a point source into the science image, subtract, and fit flux and position on the difference "
        "with `jd.forward` (Gaussian likelihood, optax L-BFGS). Repeating the fit on noise realisations of the "
        "stamp shows that the Cramér–Rao errors are right: the pulls are standard normal."
    ),
    new_code_cell(SETUP + "\nimport jax.numpy as jnp\nfrom jaxdiff import forward"),
    new_code_cell(
        """pair = jd.sim.reference_pair((128, 128), n_stars=30, seed=2, flux_range=(3000, 8000), template_border=8)
sci = pair.science
row, col = 64, 66
truth = jnp.array([2500.0, sci.xy0[0] + col + 0.3, sci.xy0[1] + row - 0.3])  # flux, x, y
stamp = forward.shifted_psf(sci.psf.image(), 0.3, -0.3, 21)
image = sci.image.at[row - 10 : row + 11, col - 10 : col + 11].add(truth[0] * stamp)
science = jd.Exposure(image, sci.variance, sci.mask, sci.psf, sci.xy0, mask_planes=sci.mask_planes)
result = jd.subtract(pair.template, science, pair.sources)
d = result.difference
cut = forward.cut_stamp(d, float(truth[1]), float(truth[2]), 21)
fit = forward.fit_point_source(cut, d.psf.image(), jnp.array([2000.0, truth[1] - 0.3, truth[2] + 0.3]))
for name, t, v, e in zip(("flux", "x", "y"), truth, fit.params, fit.errors):
    print(f"{name}: true {float(t):.3f}  fit {float(v):.3f} ± {float(e):.3f}")"""
    ),
    new_code_cell(
        """fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
model = forward.model(fit.params, cut, d.psf.image())
for ax, img, title in zip(axes, (cut.image, model, cut.image - model), ("difference stamp", "model", "residual")):
    ax.imshow(np.asarray(img), origin="lower", cmap="gray")
    ax.set_title(title)
fig.tight_layout()"""
    ),
    new_code_cell(
        """n = 60
clean = forward.model(truth, cut, d.psf.image())
noise = jax.random.normal(jax.random.key(0), (n, 21, 21)) * jnp.sqrt(cut.variance)
stamps = jax.vmap(lambda e: forward.Stamp(clean + e, cut.variance, cut.template, cut.good, cut.x0, cut.y0))(noise)
init = jnp.broadcast_to(truth * jnp.array([0.8, 1, 1]) + jnp.array([0, 0.3, -0.3]), (n, 3))
fits = jax.jit(jax.vmap(lambda s, i: forward.fit_point_source(s, d.psf.image(), i, steps=40)))(stamps, init)
pulls = np.asarray((fits.params - truth) / fits.errors)
print("pull mean", pulls.mean(0).round(2), "std", pulls.std(0, ddof=1).round(2))
fig, axes = plt.subplots(1, 3, figsize=(11, 3))
grid = np.linspace(-4, 4, 100)
for ax, p, name in zip(axes, pulls.T, ("flux", "x", "y")):
    ax.hist(p, bins=12, density=True)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi))
    ax.set_title(f"pull of {name}")
fig.tight_layout()"""
    ),
]

BATCH = [
    new_markdown_cell(
        "# Many pairs: vmap, device-sized batches, Dask\n\n"
        "`jd.batch.subtract_batch` vmaps the core over stacked pairs; `run_many` feeds a long list in batches "
        "(sharded over all devices) with a progress bar; `dask_map` sends batches of FITS pairs to Dask workers."
    ),
    new_code_cell(SETUP + "\nimport tempfile\nfrom pathlib import Path\nfrom jaxdiff.batch import dask_map, run_many"),
    new_code_cell(
        """config = jd.SubtractConfig(do_decorrelation=False)
pairs = [jd.sim.reference_pair((96, 96), n_stars=15, seed=i, flux_range=(3000, 8000), template_border=4)
         for i in range(6)]
results = run_many([(p.template, p.science, p.sources) for p in pairs], config, batch_size=3)
[float(r.metadata["kernel_sum"]) for r in results]"""
    ),
    new_code_cell(
        """from dask.distributed import Client, LocalCluster

folder = Path(tempfile.mkdtemp())
items = []
for i, p in enumerate(pairs):
    jd.write_exposure(folder / f"template_{i}.fits", p.template)
    jd.write_exposure(folder / f"science_{i}.fits", p.science)
    items.append((str(folder / f"template_{i}.fits"), str(folder / f"science_{i}.fits"), p.sources))
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
        Client(cluster) as client:
    client.run(exec, "import jax; jax.config.update('jax_enable_x64', True)")
    rows = dask_map(items, config, client, batch_size=3)
rows[0]"""
    ),
    new_code_cell(
        """diffs = [np.asarray(jd.read_exposure(r["difference"]).image) for r in rows]
print("max |dask − in-process|:", max(np.abs(a - np.asarray(r.difference.image)).max()
                                   for a, r in zip(diffs, results)))
fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
for ax, img in zip(axes, diffs):
    ax.imshow(img, origin="lower", cmap="gray")
fig.tight_layout()"""
    ),
]


def main() -> None:
    for name, cells in (("01_quickstart", QUICKSTART), ("02_forward_model", FORWARD), ("03_batch", BATCH)):
        nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
