"""Sources: fixed-length star lists, table reading and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.table import MaskedColumn, Table

import jaxdiff as jd
from tests.utils import assert_allclose


def test_pytree_round_trip():
    sources = jd.Sources([1.0, 2.5, 3.0], [4.0, 5.0, 6.5], flux=[10.0, 20.0, 30.0], valid=[True, False, True])
    leaves, treedef = jax.tree_util.tree_flatten(sources)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is jd.Sources and len(back) == 3
    for a, b in zip(jax.tree_util.tree_leaves(back), leaves, strict=True):
        np.testing.assert_array_equal(a, b)


def test_defaults():
    sources = jd.Sources([1.0, 2.0], [3.0, 4.0])
    assert np.all(np.isnan(sources.flux)) and np.all(sources.valid)
    assert sources.n_valid == 2 and len(sources) == 2


def test_from_table_with_xy_columns():
    table = Table({"x": [10.5, 20.0, 30.0], "y": [5.0, 6.0, 7.25], "flux": [3.0, 2.0, 1.0]})
    sources = jd.Sources.from_table(table, capacity=len(table))
    assert_allclose(sources.x, table["x"])
    assert_allclose(sources.y, table["y"])
    assert_allclose(sources.flux, table["flux"])
    assert sources.n_valid == 3


def test_from_table_with_lsst_slot_columns():
    table = Table(
        {
            "slot_Centroid_x": [101.0, 202.0],
            "slot_Centroid_y": [11.0, 22.0],
            "slot_PsfFlux_instFlux": [5.0, 7.0],
            "id": [1, 2],
        }
    )
    sources = jd.Sources.from_table(table, capacity=len(table))
    assert_allclose(sources.x, [101.0, 202.0])
    assert_allclose(sources.y, [11.0, 22.0])
    assert_allclose(sources.flux, [5.0, 7.0])


def test_from_table_capacity_pads_with_invalid_entries():
    table = Table({"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]})
    sources = jd.Sources.from_table(table, capacity=8)
    assert len(sources) == 8 and sources.n_valid == 3
    np.testing.assert_array_equal(sources.valid, [True] * 3 + [False] * 5)
    assert_allclose(sources.x[:3], [1.0, 2.0, 3.0])
    # padding sits at a finite in-bounds position so that it can be sliced safely
    assert np.all(np.isfinite(sources.x)) and np.all(np.isfinite(sources.y))
    assert np.all(np.isnan(sources.flux))


def test_from_table_capacity_too_small_raises():
    with pytest.raises(ValueError, match="capacity 2.*3 rows"):
        jd.Sources.from_table(Table({"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]}), capacity=2)


def test_from_table_without_position_column_raises():
    with pytest.raises(ValueError, match="no y column.*slot_Centroid_y"):
        jd.Sources.from_table(Table({"x": [1.0], "row": [2.0]}))


def test_non_finite_and_masked_rows_are_invalid():
    table = Table(
        {
            "x": MaskedColumn([1.0, 2.0, 3.0, 4.0], mask=[False, True, False, False]),
            "y": [5.0, 6.0, np.nan, 8.0],
        }
    )
    sources = jd.Sources.from_table(table, capacity=len(table))
    np.testing.assert_array_equal(sources.valid, [True, False, False, True])
    assert np.all(np.isfinite(sources.x)) and np.all(np.isfinite(sources.y))


def test_mapping_of_columns_is_accepted():
    sources = jd.Sources.from_table({"x": np.array([1.0, 2.0]), "y": np.array([3.0, 4.0])}, capacity=2)
    assert_allclose(sources.y, [3.0, 4.0])


def test_jit_and_vmap_over_stacked_lists():
    a = jd.Sources.from_table(Table({"x": [1.0, 2.0], "y": [3.0, 4.0]}), capacity=4)
    b = jd.Sources.from_table(Table({"x": [5.0, 6.0, 7.0], "y": [8.0, 9.0, 10.0]}), capacity=4)

    def weighted_sum(s):
        return jnp.sum(jnp.where(s.valid, s.x * s.y, 0.0))

    stacked = jax.tree.map(lambda *v: jnp.stack(v), a, b)
    assert_allclose(jax.jit(jax.vmap(weighted_sum))(stacked), jnp.stack([weighted_sum(a), weighted_sum(b)]))
    assert_allclose(weighted_sum(a), 1.0 * 3.0 + 2.0 * 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": [1.0, 2.0], "y": [1.0]}, "x and y"),
        ({"x": [1.0, 2.0], "y": [1.0, 2.0], "flux": [1.0]}, "flux shape"),
        ({"x": [1.0, 2.0], "y": [1.0, 2.0], "valid": [True]}, "valid shape"),
    ],
)
def test_shape_mismatch_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jd.Sources(**kwargs)


def test_from_table_pads_to_the_source_capacity_by_default():
    """Tables of any length give the same shapes (and compiled programs): padded to a multiple of 1024."""
    short = jd.Sources.from_table(Table({"x": [1.0, 2.0], "y": [3.0, 4.0]}))
    long = jd.Sources.from_table(Table({"x": np.arange(1030.0), "y": np.arange(1030.0)}))
    assert len(short) == 1024
    assert len(long) == 2048 and long.n_valid == 1030 and short.n_valid == 2
    assert not bool(np.any(np.asarray(short.valid)[2:]))
