"""Stamp design matrices and weighted normal equations (ALGORITHM §7, §8.2), in the solve dtype."""

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._types import Array, Float


def toeplitz(f: Float[Array, "r k"], n_in: int) -> Float[Array, "r n_in c"]:
    """Valid-mode 1-D convolution by each row of `f` as a matrix: out[i] = Σ_q x[q] T[q, i], c = n_in − k + 1.

    With f[h + u] the weight at offset u, out[i] = Σ_u f[h + u] x[i + h − u], so T[q, i] = f[2h − (q − i)].
    """
    k = f.shape[-1]
    c = n_in - k + 1
    j = jnp.arange(n_in)[:, None] - jnp.arange(c)[None, :]
    ok = (j >= 0) & (j < k)
    return jnp.where(ok[None], f[:, ::-1][:, jnp.clip(j, 0, k - 1)], 0.0)


def stamp_designs(stamps: Float[Array, "N s s"], fx, fy, mix, x_groups=None) -> Float[Array, "N n c c"]:
    """Basis images convolved with each stamp, on the stamps' cores (shrunk by h on each side).

    Uses the separable form of the basis (raw image r = fy[r] ⊗ fx[r], basis = mix @ raw): a pass in x
    and one in y, each a matrix product with a Toeplitz matrix over all stamps at once (ALGORITHM §16),
    then the fixed mixing matrix.

    Arguments:
        stamps: the convolved image X on (2k + 1)² stamps.
        fx, fy: 1-D factors, shape (n_raw, k), element [r, h + u] at offset u.
        mix: (n, n_raw) mixing matrix.
        x_groups: optional static (first, inverse) from `basis.x_factor_groups`: raw images that share a
            column factor share the x pass (11 passes instead of 27 for the default Alard–Lupton basis).

    Returns:
        C_b = B_b ∗ X on the (k + 2)² cores, shape (N, n, k + 2, k + 2).
    """
    s = stamps.shape[-1]
    first, inverse = (tuple(range(fx.shape[0])),) * 2 if x_groups is None else x_groups
    tx = toeplitz(fx[np.asarray(first)].astype(stamps.dtype), s)
    ty = toeplitz(fy.astype(stamps.dtype), s)
    zx = jnp.einsum("nyq,rqi->nryi", stamps, tx)[:, np.asarray(inverse)]
    zy = jnp.einsum("ryp,nryi->nrpi", ty, zx)
    return jnp.einsum("br,nrpi->nbpi", mix.astype(stamps.dtype), zy)


def stamp_normal(design, target, weight):
    """M_s = C̃ᵀ w C̃ and b_s = C̃ᵀ w t with C̃ = [C_b, 1] (background column last).

    Arguments:
        design: (n, c, c) basis columns on the core.
        target: (c, c) matched image on the core.
        weight: scalar or (c, c) inverse-variance weights (0 on unusable pixels).
    """
    n = design.shape[0]
    cols = jnp.concatenate([design.reshape(n, -1), jnp.ones((1, design[0].size), design.dtype)])
    w = jnp.broadcast_to(weight, target.shape).reshape(-1)
    cw = cols * w[None, :]
    return cw @ cols.T, cw @ target.reshape(-1)


def _valid_fft_length(s: int, k: int) -> int:
    """A fast transform length ≥ s + k − 1 (`next_fast_len`) for valid-mode stamp convolutions."""
    from ..convolve import next_fast_len

    return next_fast_len(s + k - 1)


def stamp_spectrum(image: Float[Array, "s s"], k: int):
    """rfft2 of a stamp zero-padded for valid-mode convolution with k × k kernels (see `convolve_valid_fft`)."""
    n = _valid_fft_length(image.shape[-1], k)
    return jnp.fft.rfft2(image, (n, n))


def convolve_valid_fft(image: Float[Array, "s s"], kernel: Float[Array, "k k"], image_spectrum=None):
    """Valid-mode convolution of a small stamp (output side s − k + 1) via a zero-padded FFT.

    `image_spectrum`: `stamp_spectrum(image, k)` when already known (the residual tests reuse it).
    """
    s = image.shape[-1]
    k = kernel.shape[-1]
    n = _valid_fft_length(s, k)
    fi = stamp_spectrum(image, k) if image_spectrum is None else image_spectrum
    fk = jnp.fft.rfft2(kernel.astype(jnp.real(fi).dtype), (n, n))  # in the spectrum's precision
    full = jnp.fft.irfft2(fi * fk, (n, n))
    return full[k - 1 : s, k - 1 : s].astype(jnp.result_type(image.dtype, kernel.dtype))


def residual_stats(stamp, target, var_target, var_stamp, good, alpha, basis, stamp_spectra=None):
    """Mean and sample std of the variance-normalised residual of one stamp (ALGORITHM §7).

    The model is K ∗ X + background with K = Σ_b α_b B_b: one FFT convolution of the stamp with the kernel
    image, equal to Σ_b α_b C_b for the designs C_b = B_b ∗ X of the normal equations, so the tests need no
    copy of the designs.

    Arguments:
        stamp: (2k + 1)² convolved image X; target, var_target: matched image and its variance on the core.
        var_stamp: (2k + 1)² variance of the convolved image (for K² ∗ V_X).
        good: (c, c) pixels counted.
        alpha: (n + 1,) kernel coefficients then background.
        basis: (n, k, k) basis images.
        stamp_spectra: optional (`stamp_spectrum(stamp, k)`, `stamp_spectrum(var_stamp, k)`), computed once by
            callers that test repeatedly.

    Returns:
        (mean, std) of r = D/√var_D over good pixels; NaN when undefined.
    """
    n = basis.shape[0]
    x_spectrum, var_spectrum = (None, None) if stamp_spectra is None else stamp_spectra
    kern = jnp.tensordot(alpha[:n], basis, axes=1)
    model = convolve_valid_fft(stamp, kern, x_spectrum) + alpha[n]
    var_d = var_target + convolve_valid_fft(var_stamp, kern**2, var_spectrum)
    ok = good & (var_d > 0) & jnp.isfinite(var_d)
    r = jnp.where(ok, (target - model) / jnp.sqrt(jnp.where(ok, var_d, 1.0)), 0.0)
    cnt = jnp.sum(ok)
    mean = jnp.sum(r) / cnt
    var = jnp.sum(jnp.where(ok, (r - mean) ** 2, 0.0)) / (cnt - 1)
    return mean, jnp.sqrt(var)


def spatial_groups(n: int, n_kernel_terms: int, n_bg_terms: int):
    """The rows of α_s that share one spatial term vector, in θ's order: [(rows, terms), ...].

    θ = [θ_0, θ_1 (P), …, θ_{n−1} (P), θ_bg (Q)] and α_s = E_s θ: α_s[0] = θ_0 (B_0 is spatially constant),
    α_s[i] = p_s · θ_i for 0 < i < n, α_s[n] = q_s · θ_bg (0 without background terms). `rows` is a static slice
    of α's n + 1 rows and `terms` names the vector ("one", "p" or "q").
    """
    groups = [(slice(0, 1), "one")]
    if n > 1 and n_kernel_terms > 0:
        groups.append((slice(1, n), "p"))
    if n_bg_terms > 0:
        groups.append((slice(n, n + 1), "q"))
    return groups


def _terms(p, q):
    return {"one": jnp.ones_like(p[..., :1]), "p": p, "q": q}


def _group_blocks(n: int, p, q, block):
    """The (θ, θ) matrix whose block for row groups (ri, gi), (rj, gj) of `spatial_groups` is
    `block(ri, terms[gi], rj, terms[gj])`, shaped (|ri|·len(g_i), |rj|·len(g_j))."""
    terms = _terms(p, q)
    groups = spatial_groups(n, p.shape[-1], q.shape[-1])

    def flat(m):  # (i, a, j, b) -> ((i, a), (j, b))
        return m.reshape(m.shape[0] * m.shape[1], m.shape[2] * m.shape[3])

    return jnp.block([[flat(block(ri, terms[gi], rj, terms[gj])) for rj, gj in groups] for ri, gi in groups])


def global_normal(Ms, bs, p, q, weights):
    """M = Σ_s w_s E_sᵀ M_s E_s and b = Σ_s w_s E_sᵀ b_s for the spatial unknowns θ (layout: `spatial_groups`).

    For rows i, j in groups with term vectors g, h: M[(i, a), (j, b)] = Σ_s w_s M_s[i, j] g_s[a] h_s[b], one
    matrix product over the stamps per pair of groups (no (N, n + 1, n + 1, L) intermediate).

    Arguments:
        Ms: (N, n + 1, n + 1); bs: (N, n + 1); p: (N, P) kernel terms and q: (N, Q) background terms at the
        stamps; weights: (N,) 0/1 activity.
    """
    n = Ms.shape[-1] - 1
    Mw = Ms * weights[:, None, None]
    bw = bs * weights[:, None]

    def block(ri, g, rj, h):
        return jnp.einsum("sij,sab->iajb", Mw[:, ri, rj], g[:, :, None] * h[:, None, :])

    terms = _terms(p, q)
    groups = spatial_groups(n, p.shape[-1], q.shape[-1])
    b = jnp.concatenate([jnp.einsum("si,sa->ia", bw[:, ri], terms[gi]).reshape(-1) for ri, gi in groups])
    return _group_blocks(n, p, q, block), b


def lifted_mean(G, tau, p, q):
    """Σ_s τ_s E_sᵀ G E_s for one (n + 1)² matrix G shared by the stamps (the fit's preconditioner, §8.3)."""

    def block(ri, g, rj, h):
        return jnp.einsum("ij,ab->iajb", G[ri, rj], jnp.einsum("s,sa,sb->ab", tau, g, h))

    return _group_blocks(G.shape[-1] - 1, p, q, block)


def split_theta(theta, n: int, n_kernel_terms: int):
    """θ in the layout of `spatial_groups` as (θ_0 (), the kernel terms (n − 1, P), the background terms (Q,))."""
    P = n_kernel_terms
    return theta[0], theta[1 : 1 + (n - 1) * P].reshape(n - 1, P), theta[1 + (n - 1) * P :]


# The smallest eigenvalue, relative to the largest, of the stamps' unit-diagonal term Gram matrix for which a
# spatial order counts as determined: below it the positions barely constrain some polynomial (stamps along a line
# leave every term in the other coordinate undetermined) and its coefficients would follow the noise.
TERM_CONDITION_MIN = 1e-6


def determined_terms(terms, weights, n_terms_max: int):
    """How many leading spatial terms the active stamps determine, and of which order.

    Terms are ordered by total degree (`spatial.terms`), so the first `spatial.n_terms(o)` of them are the
    model of order o. Each stamp gives one value of every coefficient, so the order-o polynomial is determined
    when its terms at the stamps are linearly independent: at least n_terms(o) stamps, and not all on a line
    (or another curve of that order). The highest order o ≤ the configured one whose unit-diagonal term Gram
    matrix has no eigenvalue below `TERM_CONDITION_MIN` times its largest is kept; order 0 (one term) when
    none is.

    Arguments:
        terms: (N, P) spatial terms at the stamp positions (P = `n_terms_max`, static; 0: no such terms).
        weights: (N,) 1 for active stamps, 0 otherwise.

    Returns:
        (number of kept terms, their order), int32 scalars.
    """
    return determined_terms_of_sets([(terms, weights, n_terms_max)])[0]


def determined_terms_of_sets(sets):
    """`determined_terms` of several term sets [(terms, weights, n_terms_max), ...] (the kernel's and the
    background's), with the eigenvalues of every candidate order of every set from one batched `eigvalsh`.

    Each order's leading c × c block of the unit-diagonal Gram matrix is embedded in the identity of the
    largest size: the extra eigenvalues are 1, which lies between the smallest and the largest eigenvalue of
    any unit-diagonal matrix (their mean is 1), so the ratio tested is the block's own.
    """
    size = max(n for _, _, n in sets)
    blocks, positive, slices, out = [], [], [], []
    for terms, weights, n_terms_max in sets:
        counts = [c for c in ((o + 1) * (o + 2) // 2 for o in range(n_terms_max + 1)) if c <= n_terms_max]
        slices.append((len(blocks), counts))
        if not counts:
            continue
        terms, weights = lax.stop_gradient((terms, weights))
        gram = jnp.einsum("s,sa,sb->ab", weights, terms, terms)
        diag = jnp.diagonal(gram)
        scale = 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
        unit = jnp.eye(size, dtype=gram.dtype).at[:n_terms_max, :n_terms_max].set(gram * scale[:, None] * scale)
        for c in counts:
            inside = jnp.arange(size) < c
            blocks.append(jnp.where(inside[:, None] & inside[None, :], unit, jnp.eye(size, dtype=unit.dtype)))
            positive.append(jnp.all(diag[:c] > 0))
    if blocks:
        ev = jnp.linalg.eigvalsh(jnp.stack(blocks))
        fixed = jnp.stack(positive) & (ev[:, 0] > TERM_CONDITION_MIN * ev[:, -1])
    for first, counts in slices:
        if not counts:
            zero = jnp.zeros((), jnp.int32)
            out.append((zero, zero))
            continue
        ok = fixed[first : first + len(counts)].astype(jnp.int32)
        order = jnp.maximum(jnp.sum(jnp.cumprod(ok)) - 1, 0).astype(jnp.int32)
        out.append((jnp.asarray(counts, jnp.int32)[order], order))
    return out


def theta_mask(n: int, n_kernel_terms: int, n_bg_terms: int, kept_p, kept_q):
    """θ entries (layout of `spatial_groups`) of the first `kept_p` kernel and `kept_q` background terms."""
    p = jnp.arange(n_kernel_terms) < kept_p
    q = jnp.arange(n_bg_terms) < kept_q
    return jnp.concatenate([jnp.ones(1, bool), jnp.tile(p, n - 1), q])


def restrict(M, mask):
    """M with the rows and columns of θ entries outside `mask` replaced by those of a diagonal matrix (their
    own diagonal, or 1 where that is not positive), so that a solve gives them 0 and leaves the rest alone."""
    d = jnp.diagonal(M)
    fill = jnp.where(mask, 0.0, jnp.where(d > 0, d, 1.0))
    return jnp.where(mask[:, None] & mask[None, :], M, 0.0) + jnp.diag(fill).astype(M.dtype)


def stamp_alphas(theta, p, q, n: int):
    """α_s = E_s θ for every stamp: (N, n + 1)."""
    N = p.shape[0]
    theta0, kernel, bg = split_theta(theta, n, p.shape[-1])
    bg_col = (q @ bg)[:, None] if q.shape[-1] > 0 else jnp.zeros((N, 1), theta.dtype)
    return jnp.concatenate([jnp.broadcast_to(theta0, (N, 1)), p @ kernel.T, bg_col], axis=1)
