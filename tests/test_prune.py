"""The public contract of `tops_jax.prune`, checked for every registered method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tops_jax import prune

N, D = 36, 8  # N is a perfect square so spatial pooling has its default grid
METHODS = list(prune.METHODS)


def _inputs(seed=0, batch=None, n=N, d=D):
  rng = np.random.default_rng(seed)
  lead = (n,) if batch is None else (batch, n)
  # Well-separated clusters so that bf16 rounding cannot reorder the decisions that matter.
  centres = rng.normal(size=(6, d)) * 4
  features = centres[rng.integers(0, 6, size=lead)] + rng.normal(size=lead + (d,))
  relevance = rng.uniform(size=lead)
  return features.astype(np.float32), relevance.astype(np.float32)


def _kwargs(method, relevance, key=jax.random.key(0)):
  spec = prune.METHODS[method]
  kwargs = {}
  if spec.needs_relevance or method in ("tops", "trimtokenator"):
    kwargs["relevance"] = relevance
  if spec.needs_key:
    kwargs["key"] = key
  return kwargs


def test_registry_lists_the_public_methods():
  assert set(prune.METHODS) == {"tops", "trimtokenator", "fastv", "divprune", "cdpruner", "scope", "visionzip",
                                "dart", "random", "pooling"}


@pytest.mark.parametrize("method", METHODS)
def test_sorted_unique_valid(method):
  features, relevance = _inputs(1)
  valid = np.ones(N, bool)
  valid[[0, 5, 6, 7, 20, 35]] = False
  idx = np.asarray(prune.select(method, features, keep=9, valid=valid, **_kwargs(method, relevance)))
  assert idx.shape == (9,) and idx.dtype == np.int32
  assert (np.diff(idx) > 0).all(), idx
  assert valid[idx].all(), idx


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_returns_everything(method):
  features, relevance = _inputs(2)
  idx = prune.select(method, features, keep=N, **_kwargs(method, relevance))
  np.testing.assert_array_equal(np.asarray(idx), np.arange(N))


@pytest.mark.parametrize("method", METHODS)
def test_order_is_a_permutation_of_select(method):
  features, relevance = _inputs(3)
  kwargs = _kwargs(method, relevance)
  order = np.asarray(prune.select_order(method, features, keep=7, **kwargs))
  np.testing.assert_array_equal(np.sort(order), np.asarray(prune.select(method, features, keep=7, **kwargs)))


@pytest.mark.parametrize("method", METHODS)
def test_jit_equals_eager(method):
  features, relevance = _inputs(4)
  kwargs = _kwargs(method, relevance)
  eager = prune.select(method, features, keep=10, **kwargs)
  jitted = jax.jit(lambda f, kw: prune.select(method, f, keep=10, **kw))(features, kwargs)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


@pytest.mark.parametrize("method", METHODS)
def test_vmap_and_batch_equal_a_loop(method):
  features, relevance = _inputs(5, batch=3)
  valid = np.ones((3, N), bool)
  valid[1, :10] = False
  valid[2, 1::4] = False
  key = jax.random.key(7)
  rows = []
  for b in range(3):
    kw = _kwargs(method, relevance[b], key=jax.random.fold_in(key, b))
    rows.append(np.asarray(prune.select(method, features[b], keep=8, valid=valid[b], **kw)))
  batched = prune.select(method, features, keep=8, valid=valid, **_kwargs(method, relevance, key=key))
  np.testing.assert_array_equal(np.asarray(batched), np.stack(rows))

  def one(f, r, v, k):
    return prune.select(method, f, keep=8, valid=v, **_kwargs(method, r, key=k))
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(3))
  np.testing.assert_array_equal(np.asarray(jax.vmap(one)(features, relevance, valid, keys)), np.stack(rows))


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_close_to_float32(method):
  features, relevance = _inputs(6)
  kwargs = _kwargs(method, relevance)
  f32 = set(np.asarray(prune.select(method, features, keep=12, **kwargs)).tolist())
  bf16 = set(np.asarray(prune.select(method, jnp.asarray(features, jnp.bfloat16), keep=12, **kwargs)).tolist())
  assert len(f32 & bf16) >= 10, (sorted(f32), sorted(bf16))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
  features, relevance = _inputs(8)
  kwargs = _kwargs(method, relevance)
  a = prune.select(method, features, keep=11, **kwargs)
  b = prune.select(method, features.copy(), keep=11, **kwargs)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", prune.MERGE_METHODS)
def test_merge_shapes_and_indices(method):
  features, relevance = _inputs(9, batch=2)
  kwargs = _kwargs(method, relevance)
  tokens, idx = prune.merge(method, features, keep=8, **kwargs)
  assert tokens.shape == (2, 8, D) and idx.shape == (2, 8)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(prune.select(method, features, keep=8, **kwargs)))


# --- bad input ---------------------------------------------------------------------------------------------------

def test_unknown_method_lists_known_ones():
  features, _ = _inputs()
  with pytest.raises(ValueError, match=r"unknown method 'topz'.*tops, trimtokenator, fastv"):
    prune.select("topz", features, keep=3)


@pytest.mark.parametrize("keep", [0, -2])
def test_keep_must_be_positive(keep):
  features, relevance = _inputs()
  with pytest.raises(ValueError, match="keep must be >= 1"):
    prune.select("tops", features, keep=keep, relevance=relevance)


def test_keep_larger_than_n():
  features, relevance = _inputs()
  with pytest.raises(ValueError, match=f"keep=37 exceeds the number of tokens N={N}"):
    prune.select("tops", features, keep=37, relevance=relevance)


def test_keep_larger_than_valid_count_names_the_row():
  features, relevance = _inputs(batch=2)
  valid = np.ones((2, N), bool)
  valid[1, :30] = False
  with pytest.raises(ValueError, match=r"keep=7 exceeds the number of valid tokens \(6 in row 1\)"):
    prune.select("divprune", features, keep=7, valid=valid)


def test_keep_must_be_static_int():
  features, relevance = _inputs()
  with pytest.raises(ValueError, match="keep must be a static Python int"):
    prune.select("tops", features, keep=3.5, relevance=relevance)


def test_rank_and_shape_mismatches():
  features, relevance = _inputs(batch=2)
  with pytest.raises(ValueError, match=r"features must be float\[N, D\] or float\[B, N, D\], got shape \(36,\)"):
    prune.select("tops", features[0, :, 0], keep=3)
  with pytest.raises(ValueError, match=r"relevance must have shape \(2, 36\).*got \(36,\)"):
    prune.select("tops", features, keep=3, relevance=relevance[0])
  with pytest.raises(ValueError, match=r"valid must have shape \(2, 36\)"):
    prune.select("divprune", features, keep=3, valid=np.ones((2, 35), bool))
  with pytest.raises(ValueError, match="valid must be a bool mask"):
    prune.select("divprune", features, keep=3, valid=np.ones((2, N), np.int32))
  with pytest.raises(ValueError, match="features must be floating point"):
    prune.select("divprune", features.astype(np.int32), keep=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_named(bad):
  features, relevance = _inputs()
  features[4, 2] = bad
  with pytest.raises(ValueError, match=r"features contain NaN or inf at token positions \[\[4\]\]"):
    prune.select("tops", features, keep=3, relevance=relevance)
  features, relevance = _inputs()
  relevance[3] = bad
  with pytest.raises(ValueError, match="relevance contains NaN or inf"):
    prune.select("tops", features, keep=3, relevance=relevance)


def test_non_finite_under_jit_ranks_last():
  # Under an outer jit the value checks cannot raise: a NaN token is then never picked ahead of a finite one.
  features, relevance = _inputs()
  features[4] = np.nan
  idx = jax.jit(lambda f, r: prune.select("tops", f, keep=20, relevance=r))(features, relevance)
  assert 4 not in np.asarray(idx).tolist()


def test_missing_relevance_and_key():
  features, _ = _inputs()
  with pytest.raises(ValueError, match="fastv: this method needs a relevance vector"):
    prune.select("fastv", features, keep=3)
  with pytest.raises(ValueError, match="random: this method is random and needs an explicit PRNG key"):
    prune.select("random", features, keep=3)


def test_merge_on_a_selection_only_method():
  features, _ = _inputs()
  with pytest.raises(ValueError, match="divprune does not merge tokens; merging methods: visionzip"):
    prune.merge("divprune", features, keep=3)


def test_batched_array_hyperparameter_must_match_batch():
  features, relevance = _inputs(batch=2)
  with pytest.raises(ValueError, match="array hyperparameter keys has leading axis 3, expected the batch size 2"):
    prune.select("dart", features, keep=3, keys=np.zeros((3, N, 4), np.float32))


def test_unknown_hyperparameter_is_named():
  features, relevance = _inputs()
  with pytest.raises(ValueError, match=r"tops: unknown hyperparameter\(s\) lamda; tops takes: alpha, lam"):
    prune.select("tops", features, keep=3, relevance=relevance, lamda=0.5)
