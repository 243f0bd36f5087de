import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.solvers import symmetric_solve


def _spd(rng, m):
    a = rng.normal(size=(m, m))
    return a @ a.T + m * np.eye(m)


def _scaled_pinv_solve(M, b):
    """The fallback's definition in numpy: Jacobi scaling, pseudo-inverse (eigenvalues ≤ m·ε·λ_max dropped)."""
    s = 1.0 / np.sqrt(np.where(np.diag(M) > 0, np.diag(M), 1.0))
    Ms = M * s[:, None] * s[None, :]
    ev, V = np.linalg.eigh(0.5 * (Ms + Ms.T))
    keep = ev > M.shape[0] * np.finfo(M.dtype).eps * np.max(np.abs(ev))
    inv = np.where(keep, 1.0 / np.where(keep, ev, 1.0), 0.0)
    return s * (V @ (inv * (V.T @ (b * s))))


@pytest.fixture
def systems():
    rng = np.random.default_rng(3)
    Ms = np.stack([_spd(rng, 6) for _ in range(4)])
    bs = rng.normal(size=(4, 6))
    return Ms, bs


def test_a_batch_of_positive_definite_systems_is_solved(systems):
    Ms, bs = systems
    x = symmetric_solve(jnp.asarray(Ms), jnp.asarray(bs))
    np.testing.assert_allclose(x, np.linalg.solve(Ms, bs[..., None])[..., 0], rtol=1e-12)
    one = symmetric_solve(jnp.asarray(Ms[2]), jnp.asarray(bs[2]))
    np.testing.assert_allclose(one, x[2], rtol=1e-13)
    stacked = symmetric_solve(jnp.asarray(Ms.reshape(2, 2, 6, 6)), jnp.asarray(bs.reshape(2, 2, 6)))
    np.testing.assert_allclose(stacked.reshape(4, 6), x, rtol=1e-13)


def test_a_singular_matrix_in_the_batch_takes_the_pseudo_inverse_alone(systems):
    """One rank-deficient system sends the batch into the fallback; it gets the minimum-norm solution of its
    scaled system, and the others keep their Cholesky solutions."""
    Ms, bs = systems
    rng = np.random.default_rng(4)
    a = rng.normal(size=(6, 3))
    Ms = Ms.copy()
    Ms[1] = a @ a.T  # rank 3, positive semi-definite
    bs = bs.copy()
    bs[1] = Ms[1] @ rng.normal(size=6)  # in the range: a consistent system
    x = np.asarray(symmetric_solve(jnp.asarray(Ms), jnp.asarray(bs)))
    np.testing.assert_allclose(x[1], _scaled_pinv_solve(Ms[1], bs[1]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(Ms[1] @ x[1], bs[1], rtol=1e-8, atol=1e-9)
    good = [0, 2, 3]
    np.testing.assert_allclose(x[good], np.linalg.solve(Ms[good], bs[good][..., None])[..., 0], rtol=1e-12)


def test_gradients_are_finite_and_match_the_closed_form(systems):
    Ms, bs = systems
    M, b = jnp.asarray(Ms[0]), jnp.asarray(bs[0])
    grad_b = jax.grad(lambda v: jnp.sum(symmetric_solve(M, v)))(b)
    np.testing.assert_allclose(grad_b, np.linalg.solve(Ms[0].T, np.ones(6)), rtol=1e-12)
    grad_M = jax.grad(lambda A: jnp.sum(symmetric_solve(A, b) ** 2))(M)
    assert np.all(np.isfinite(grad_M))
    batched = jax.grad(lambda A: jnp.sum(symmetric_solve(A, jnp.asarray(bs)) ** 2))(jnp.asarray(Ms))
    assert np.all(np.isfinite(batched))
    np.testing.assert_allclose(batched[0], grad_M, rtol=1e-10)


def test_under_vmap_equals_the_batched_call(systems):
    Ms, bs = systems
    Ms = Ms.copy()
    Ms[3] = np.diag([1.0, 2.0, 0.0, 3.0, 4.0, 5.0])  # singular: Cholesky fails for this one
    mapped = jax.vmap(symmetric_solve)(jnp.asarray(Ms), jnp.asarray(bs))
    np.testing.assert_allclose(mapped, symmetric_solve(jnp.asarray(Ms), jnp.asarray(bs)), rtol=1e-12)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e8])
def test_condition_number_matches_eigvalsh(cond):
    """The Cholesky-bisection condition number equals LAPACK's λ_max/λ_min to the round-off both share
    (about ε·cond); a singular or indefinite matrix gives a negative number, as the fit's warning expects."""
    from jaxdiff.solvers import condition_number

    rng = np.random.default_rng(int(np.log10(cond)))
    q, _ = np.linalg.qr(rng.normal(size=(85, 85)))
    M = (q * (3.7 * np.logspace(0, np.log10(cond), 85))) @ q.T
    ev = np.linalg.eigvalsh(M)
    got = float(jax.jit(condition_number)(jnp.asarray(M)))
    assert got == pytest.approx(ev[-1] / ev[0], rel=max(1e-13, 100 * np.finfo(float).eps * cond))
    assert float(condition_number(jnp.diag(jnp.array([-1.0, 2.0, 3.0])))) == pytest.approx(-3.0)
    assert float(condition_number(jnp.diag(jnp.array([0.0, 2.0, 3.0])))) < 0


@pytest.mark.parametrize(("n", "P", "Q"), [(27, 6, 3), (27, 3, 6), (1, 3, 1), (5, 1, 0)])
def test_global_normal_equals_the_explicit_stamp_maps(n, P, Q):
    """M = Σ w_s E_sᵀ M_s E_s, b = Σ w_s E_sᵀ b_s and α_s = E_s θ with E_s built as a dense matrix (§8.2)."""
    from jaxdiff._fit import _preconditioner
    from jaxdiff.solvers._normal import global_normal, stamp_alphas

    rng = np.random.default_rng(n + P + Q)
    S = 40
    A = rng.normal(size=(S, n + 1, n + 1))
    Ms = A @ A.transpose(0, 2, 1)
    bs = rng.normal(size=(S, n + 1))
    p, q = rng.normal(size=(S, P)), rng.normal(size=(S, Q))
    w = (rng.random(S) < 0.7).astype(float)
    T = 1 + (n - 1) * P + Q
    E = np.zeros((S, n + 1, T))  # α_s = E_s θ: θ_0 constant, θ_i · p_s for 0 < i < n, θ_bg · q_s
    E[:, 0, 0] = 1.0
    for i in range(1, n):
        E[:, i, 1 + (i - 1) * P : 1 + i * P] = p
    E[:, n, 1 + (n - 1) * P :] = q
    M_ref = np.einsum("s,sit,sij,sju->tu", w, E, Ms, E)
    b_ref = np.einsum("s,sit,si->t", w, E, bs)
    with jax.enable_x64(True):
        M, b = global_normal(jnp.asarray(Ms), jnp.asarray(bs), jnp.asarray(p), jnp.asarray(q), jnp.asarray(w))
        theta = rng.normal(size=T)
        alphas = stamp_alphas(jnp.asarray(theta), jnp.asarray(p), jnp.asarray(q), n)
        precond = _preconditioner(jnp.asarray(Ms), jnp.asarray(p), jnp.asarray(q), jnp.asarray(w))
    np.testing.assert_allclose(M, M_ref, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(alphas, np.einsum("sit,t->si", E, theta), rtol=1e-12, atol=1e-12)
    tau = np.trace(Ms, axis1=1, axis2=2) * w
    G = np.einsum("s,sij->ij", w, Ms) / tau.sum()
    np.testing.assert_allclose(precond, np.einsum("s,sit,ij,sju->tu", tau, E, G, E), rtol=1e-12, atol=1e-10)


def _stamp_terms(x, y, order):
    from jaxdiff import spatial

    box = jnp.array([0.0, 0.0, 2048.0, 2048.0])
    return spatial.terms(jnp.asarray(x, float), jnp.asarray(y, float), box, order).T


@pytest.mark.parametrize(
    ("n_stamps", "expected"),
    [(0, (1, 0)), (1, (1, 0)), (2, (1, 0)), (3, (3, 1)), (5, (3, 1)), (6, (6, 2)), (40, (6, 2))],
)
def test_determined_terms_keep_the_highest_order_the_stamps_fix(n_stamps, expected):
    """Stamps spread over the field: an order-o polynomial (n_terms(o) terms) needs n_terms(o) of them."""
    from jaxdiff.solvers._normal import determined_terms

    rng = np.random.default_rng(n_stamps)
    x, y = rng.uniform(100, 1900, 40), rng.uniform(100, 1900, 40)
    with jax.enable_x64(True):
        weights = (jnp.arange(40) < n_stamps).astype(float)
        kept, order = determined_terms(_stamp_terms(x, y, 2), weights, 6)
        assert (int(kept), int(order)) == expected
        kept1, order1 = determined_terms(_stamp_terms(x, y, 1), weights, 3)  # a configured order 1 stays ≤ 1
        assert (int(kept1), int(order1)) == (min(expected[0], 3), min(expected[1], 1))
        assert tuple(map(int, determined_terms(jnp.zeros((40, 0)), weights, 0))) == (0, 0)


def test_stamps_on_a_line_do_not_determine_the_other_coordinate():
    """20 stamps on one row fix no y dependence: order 0, whatever their number. Stamps off the row: one gives
    order 1 (3 terms); order 2 (6 terms) needs three, since the row itself spans only 1, x and x²."""
    from jaxdiff.solvers._normal import determined_terms

    x = np.linspace(100, 1900, 20)
    with jax.enable_x64(True):
        w = jnp.ones(20)
        assert tuple(map(int, determined_terms(_stamp_terms(x, np.full(20, 700.0), 2), w, 6))) == (1, 0)
        y = np.full(20, 700.0)
        y[7] = 1500.0
        assert tuple(map(int, determined_terms(_stamp_terms(x, y, 2), w, 6))) == (3, 1)
        y[12] = 300.0  # 2 stamps off the row: 5 independent directions of the 6 order-2 terms
        assert tuple(map(int, determined_terms(_stamp_terms(x, y, 2), w, 6))) == (3, 1)
        y[3] = 1200.0
        assert tuple(map(int, determined_terms(_stamp_terms(x, y, 2), w, 6))) == (6, 2)


@pytest.mark.parametrize("n_stamps", [0, 2, 3, 4, 6, 7, 25])
def test_term_sets_decided_together_match_each_block_s_own_eigenvalues(n_stamps):
    """The kernel (order 1) and background (order 2) decided by one batched eigvalsh, against numpy's
    eigenvalues of every leading block on its own, for spread stamps and for stamps on a line."""
    from jaxdiff.solvers._normal import TERM_CONDITION_MIN, determined_terms_of_sets

    def reference(terms, w):
        gram = np.einsum("s,sa,sb->ab", w, terms, terms)
        d = np.diag(gram)
        unit = gram / np.sqrt(np.outer(np.where(d > 0, d, 1), np.where(d > 0, d, 1)))
        order = 0
        for o, c in enumerate((1, 3, 6)[: {1: 1, 3: 2, 6: 3}[terms.shape[1]]]):
            ev = np.linalg.eigvalsh(unit[:c, :c])
            if not (np.all(d[:c] > 0) and ev[0] > TERM_CONDITION_MIN * ev[-1]):
                break
            order = o
        return (order + 1) * (order + 2) // 2, order

    rng = np.random.default_rng(n_stamps)
    x = rng.uniform(100, 1900, 30)
    for y in (rng.uniform(100, 1900, 30), np.full(30, 900.0)):
        with jax.enable_x64(True):
            w = (jnp.arange(30) < n_stamps).astype(float)
            p, q = _stamp_terms(x, y, 1), _stamp_terms(x, y, 2)
            got = determined_terms_of_sets([(p, w, 3), (q, w, 6)])
            want = [reference(np.asarray(p), np.asarray(w)), reference(np.asarray(q), np.asarray(w))]
            assert [tuple(map(int, g)) for g in got] == want


def test_a_restricted_solve_solves_the_kept_system_and_zeroes_the_rest():
    """n = 4 basis images, P = 6 and Q = 6 terms reduced to 3 and 1: the kept block solved alone, 0 elsewhere."""
    from jaxdiff.solvers._normal import restrict, theta_mask

    n, P, Q = 4, 6, 6
    T = 1 + (n - 1) * P + Q
    rng = np.random.default_rng(7)
    a = rng.normal(size=(T, T - 5))
    M = a @ a.T  # rank T − 5: singular as a whole
    b = rng.normal(size=T)
    with jax.enable_x64(True):
        mask = np.asarray(theta_mask(n, P, Q, jnp.asarray(3), jnp.asarray(1)))
        x = np.asarray(symmetric_solve(restrict(jnp.asarray(M), jnp.asarray(mask)), jnp.where(mask, b, 0.0)))
    assert mask.sum() == 1 + (n - 1) * 3 + 1
    assert mask[1 : 1 + P].tolist() == [True] * 3 + [False] * 3
    kept = np.flatnonzero(mask)
    np.testing.assert_allclose(x[kept], np.linalg.solve(M[np.ix_(kept, kept)], b[kept]), rtol=1e-9)
    assert np.all(x[~mask] == 0.0)
