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
                                "dart", "random", "pooling", "vispruner", "prumerge_plus", "pdrop"}


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


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_jit_equals_eager(method):
  features, relevance = _inputs(4)
  kwargs = _kwargs(method, relevance)
  eager = prune.select(method, features, keep=10, **kwargs)
  jitted = jax.jit(lambda f, kw: prune.select(method, f, keep=10, **kw))(features, kwargs)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


@pytest.mark.slow
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


@pytest.mark.slow
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
  with pytest.raises(ValueError, match=r"features has NaN or inf at token positions \[4\] \(1 in all\)"):
    prune.select("tops", features, keep=3, relevance=relevance)
  features, relevance = _inputs()
  relevance[3] = bad
  with pytest.raises(ValueError, match=r"relevance has NaN or inf at token positions \[3\]"):
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


# --- values that must never give a wrong selection silently ----------------------------------------------------

def _usable_check(idx, keep, usable, valid):
  """`keep` distinct indices; usable tokens first when there are enough, else every usable token, then valid ones."""
  idx = np.asarray(idx)
  assert idx.shape[-1] == keep
  for row, u, v in zip(idx.reshape(-1, keep), usable.reshape(-1, usable.shape[-1]), valid.reshape(-1, valid.shape[-1])):
    assert len(set(row.tolist())) == keep, row
    if u.sum() >= keep:
      assert u[row].all(), (row, np.flatnonzero(~u))
    else:
      assert set(np.flatnonzero(u)) <= set(row.tolist()), row
      assert v[row].sum() == min(keep, v.sum()), row


def _corrupt(kind, features, relevance):
  """Copies with non-finite values; returns (features, relevance, bad_feature_tokens, bad_relevance_tokens)."""
  f, r = features.copy(), relevance.copy()
  bad_f, bad_r = np.zeros(r.shape, bool), np.zeros(r.shape, bool)
  if kind == "nan_token":
    bad_f[..., [0, 3, 17]] = True
  elif kind == "inf_token":
    bad_f[..., [1, 2]] = True
  elif kind == "all_nan":
    bad_f[...] = True
  elif kind == "nan_relevance":
    bad_r[..., [0, 5, 9]] = True
  elif kind == "all_nan_relevance":
    bad_r[...] = True
  f[bad_f] = np.inf if kind == "inf_token" else np.nan
  r[bad_r] = np.nan
  return f, r, bad_f, bad_r


# What each method reads, written out (not read from the registry) so that the tests below check the registry too.
_IGNORES_FEATURE_VALUES = ("fastv", "random", "pooling", "prumerge_plus", "pdrop")
_READS_RELEVANCE = ("tops", "trimtokenator", "fastv", "cdpruner", "scope", "visionzip", "vispruner", "prumerge_plus",
                    "pdrop")


def test_registry_says_what_each_method_reads():
  for name, spec in prune.METHODS.items():
    assert spec.reads_features == (name not in _IGNORES_FEATURE_VALUES), name
    assert (spec.relevance_role() != "unused") == (name in _READS_RELEVANCE), name


def _usable(method, kwargs, valid, bad_f, bad_r):
  usable = valid.copy()
  if method not in _IGNORES_FEATURE_VALUES:
    usable &= ~bad_f
  if "relevance" in kwargs and method in _READS_RELEVANCE:
    usable &= ~bad_r
  return usable


_KINDS = ["nan_token", "inf_token", "all_nan", "nan_relevance", "all_nan_relevance"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_values_under_jit_and_vmap_give_unique_valid_indices(method, kind):
  features, relevance = _inputs(11, batch=2)
  valid = np.ones((2, N), bool)
  valid[1, 20:] = False
  f, r, bad_f, bad_r = _corrupt(kind, features, relevance)
  kwargs = _kwargs(method, r)
  usable = _usable(method, kwargs, valid, bad_f, bad_r)
  keep = 8
  jitted = jax.jit(lambda f, v, kw: prune.select(method, f, keep=keep, valid=v, **kw))(f, valid, kwargs)
  _usable_check(jitted, keep, usable, valid)
  again = jax.jit(lambda f, v, kw: prune.select(method, f, keep=keep, valid=v, **kw))(f, valid, kwargs)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(again))      # deterministic
  keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.key(0), b))(jnp.arange(2))

  def one(f, v, r, k):
    return prune.select(method, f, keep=keep, valid=v, **_kwargs(method, r, key=k))
  _usable_check(jax.vmap(one)(f, valid, r, keys), keep, usable, valid)


@pytest.mark.parametrize("method", METHODS)
def test_too_few_usable_tokens_under_jit_fill_with_valid_then_invalid(method):
  features, relevance = _inputs(12)
  valid = np.zeros(N, bool)
  valid[:10] = True
  features[[2, 4, 6, 8]] = np.nan          # 6 usable (for methods reading features), 10 valid, keep 12
  kwargs = _kwargs(method, relevance)
  usable = _usable(method, kwargs, valid, np.isnan(features).any(-1), np.zeros(N, bool))
  order = np.asarray(jax.jit(lambda f, v, kw: prune.select_order(method, f, keep=12, valid=v, **kw))(
      features, valid, kwargs))
  _usable_check(order, 12, usable, valid)
  n_usable = int(usable.sum())
  assert usable[order[:n_usable]].all(), order
  rest = order[n_usable:]
  tail = np.concatenate([np.flatnonzero(valid & ~usable), np.flatnonzero(~valid)])[:len(rest)]
  np.testing.assert_array_equal(rest, tail)                              # index order, valid before invalid


def test_nan_hyperparameter_under_jit_gives_unique_valid_indices():
  features, relevance = _inputs(13, batch=2)
  valid = np.ones((2, N), bool)
  valid[:, ::3] = False
  for name in ("alpha", "lam"):
    idx = jax.jit(lambda f, r, a: prune.select("tops", f, keep=6, relevance=r, valid=valid, **{name: a}))(
        features, relevance, np.float32(np.nan))
    _usable_check(idx, 6, valid, valid)


@pytest.mark.parametrize("method, name", [("tops", "alpha"), ("tops", "lam"), ("scope", "alpha"),
                                          ("cdpruner", "eps"), ("trimtokenator", "sigma")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hyperparameters_are_named(method, name, value):
  features, relevance = _inputs()
  extra = {"text": features[:3], "mi_estimator": "gaussian"} if method == "trimtokenator" else {}
  with pytest.raises(ValueError, match=f"{method}: {name} must be finite, got {value}"):
    prune.select(method, features, keep=3, relevance=relevance, **extra, **{name: value})


def test_non_finite_hyperparameter_in_a_pruning_config_is_named():
  from models import pruning  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="tops: alpha must be finite, got nan"):
    pruning.tops_schedule(num_layers=32, target=64, stage1_alpha=float("nan"))
  with pytest.raises(ValueError, match="tops: lam must be finite, got inf"):
    pruning.tops_schedule(num_layers=32, target=64, stage2_alpha=0.5, stage2_lam=float("inf"))


@pytest.mark.parametrize("method, hp, problem", [
    ("tops", {"alpha": "x"}, r"tops: alpha must be a finite real number \(or an array of them\), got 'x'"),
    ("tops", {"alpha": None}, "tops: alpha must be a finite real number .*, got None"),
    ("tops", {"lam": True}, "tops: lam must be a finite real number .*, got True"),
    ("tops", {"normalize": 3}, "tops: normalize must be a string, got 3"),
    ("dart", {"pivots": 2.5}, "dart: pivots must be a Python int, got 2.5"),
    ("dart", {"pivots": True}, "dart: pivots must be a Python int, got True"),
    ("cdpruner", {"theta": "0.5"}, "cdpruner: theta must be a finite real number .* or None, got '0.5'"),
    ("trimtokenator", {"normalize": "yes"}, "trimtokenator: normalize must be a bool, got 'yes'"),
    ("visionzip", {"keys": [[1.0]]}, "visionzip: keys must be an array or None, got"),
])
def test_hyperparameter_types_are_named(method, hp, problem):
  features, relevance = _inputs()
  with pytest.raises(ValueError, match=problem):
    prune.select(method, features, keep=3, relevance=relevance, **hp)


def test_int_for_a_float_hyperparameter_is_traced_like_a_float():
  features, relevance = _inputs()
  np.testing.assert_array_equal(np.asarray(prune.select("tops", features, keep=5, relevance=relevance, alpha=1)),
                                np.asarray(prune.select("tops", features, keep=5, relevance=relevance, alpha=1.0)))


@pytest.mark.parametrize("keep", [True, False, np.bool_(True)])
def test_keep_must_not_be_a_bool(keep):
  features, relevance = _inputs()
  with pytest.raises(ValueError, match="keep must be a static Python int"):
    prune.select("tops", features, keep=keep, relevance=relevance)


@pytest.mark.parametrize("name", ["features", "relevance", "valid"])
def test_python_lists_are_named_not_dumped(name):
  features, relevance = _inputs()
  args = {"features": features, "relevance": relevance, "valid": np.ones(N, bool)}
  args[name] = args[name].tolist()
  with pytest.raises(ValueError) as info:
    prune.select("tops", args.pop("features"), keep=3, **args)
  message = str(info.value)
  assert message == f"tops: {name} must be an array (numpy.ndarray or jax.Array), got list", message


def test_needs_relevance_follows_the_hyperparameters():
  assert "tops" in prune.NEEDS_RELEVANCE
  assert prune.needs_relevance("tops")
  assert not prune.needs_relevance("tops", criteria=("diversity", "coverage"))
  assert prune.relevance_role("tops", criteria=("diversity", "coverage")) == "read"  # the seed reads it
  assert prune.relevance_role("trimtokenator", text=np.ones((2, D), np.float32)) == "unused"
  assert prune.relevance_role("divprune") == "unused"
  features, _ = _inputs()
  prune.select("tops", features, keep=3, criteria=("diversity", "coverage"))       # no relevance needed


def test_concrete_relevance_closed_over_inside_jit():
  features, relevance = _inputs(14, batch=2)
  eager = prune.select("tops", features, keep=4, relevance=relevance)
  jitted = jax.jit(lambda f: prune.select("tops", f, keep=4, relevance=relevance))(features)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
  bad = relevance.copy()
  bad[1, 7] = np.nan
  with pytest.raises(ValueError, match=r"tops: relevance has NaN or inf at token positions \[\[1, 7\]\]"):
    jax.jit(lambda f: prune.select("tops", f, keep=4, relevance=bad))(features)


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_padding_is_accepted_eagerly(method):
  features, relevance = _inputs(15)
  valid = np.ones(N, bool)
  valid[[3, 10, 11]] = False
  clean = prune.select(method, features, keep=6, valid=valid, **_kwargs(method, relevance))
  features[~valid] = np.nan
  relevance[~valid] = np.inf
  dirty = prune.select(method, features, keep=6, valid=valid, **_kwargs(method, relevance))
  np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


@pytest.mark.parametrize("method", [m for m in METHODS if m not in _READS_RELEVANCE])
def test_nan_relevance_is_ignored_by_methods_that_do_not_read_it(method):
  features, relevance = _inputs(16)
  relevance[4] = np.nan
  key = {"key": jax.random.key(0)} if prune.METHODS[method].needs_key else {}
  np.testing.assert_array_equal(np.asarray(prune.select(method, features, keep=6, relevance=relevance, **key)),
                                np.asarray(prune.select(method, features, keep=6, **key)))


def test_nan_relevance_is_rejected_by_methods_that_read_it():
  features, relevance = _inputs(16)
  relevance[4] = np.nan
  for method in _READS_RELEVANCE:
    with pytest.raises(ValueError, match=rf"{method}: relevance has NaN or inf at token positions \[4\]"):
      prune.select(method, features, keep=6, relevance=relevance, **({"key": jax.random.key(0)}
                                                                     if prune.METHODS[method].needs_key else {}))


def test_non_finite_array_hyperparameter_is_named_only_where_read():
  features, relevance = _inputs(17)
  text = features[:4].copy()
  text_valid = np.array([True, True, True, False])
  text[3] = np.nan                                     # padding text row: not read
  prune.select("trimtokenator", features, keep=5, text=text, text_valid=text_valid)
  text[1, 0] = np.inf
  with pytest.raises(ValueError, match=r"trimtokenator: text has NaN or inf at token positions \[1\]"):
    prune.select("trimtokenator", features, keep=5, text=text, text_valid=text_valid)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
@pytest.mark.parametrize("method", METHODS)
def test_selection_does_not_depend_on_the_feature_scale(method, scale):
  features, relevance = _inputs(18, batch=2)
  kwargs = _kwargs(method, relevance)
  np.testing.assert_array_equal(np.asarray(prune.select(method, features * np.float32(scale), keep=9, **kwargs)),
                                np.asarray(prune.select(method, features, keep=9, **kwargs)))


@pytest.mark.parametrize("kind", ["nan_token", "all_nan", "nan_relevance"])
@pytest.mark.parametrize("method", prune.MERGE_METHODS)
def test_merge_under_jit_with_non_finite_inputs_gives_distinct_indices_and_finite_tokens(method, kind):
  features, relevance = _inputs(19, batch=2)
  f, r, _, _ = _corrupt(kind, features, relevance)
  tokens, idx = jax.jit(lambda f, r: prune.merge(method, f, keep=8, relevance=r))(f, r)
  idx = np.asarray(idx)
  assert all(len(set(row.tolist())) == 8 for row in idx), idx
  assert np.isfinite(np.asarray(tokens)).all()


@pytest.mark.parametrize("method", ["tops", pytest.param("divprune", marks=pytest.mark.slow), pytest.param("random", marks=pytest.mark.slow)])
def test_selection_is_pure_of_the_mesh_and_takes_per_row_keys(method):
  """Under a mesh a batched call is the plain program (the per-device split is `models.pruning.selection`'s) with
  the unsharded picks; one key per row (`row_keys`) picks what the folded single key picks."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  feats = rng.randn(8, 40, 16).astype(np.float32)
  rel = rng.rand(8, 40).astype(np.float32)
  valid = rng.rand(8, 40) > 0.2
  key = jax.random.key(2) if method == "random" else None
  kw = dict(keep=6, relevance=rel, valid=valid, key=key)
  want = prune.select(method, feats, **kw)
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(feats, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    got = prune.select(method, sharded, **kw)
    assert "shard_map" not in str(jax.make_jaxpr(lambda f: prune.select(method, f, **kw))(sharded))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  if key is not None:
    per_row = prune.select(method, feats, **dict(kw, key=prune.row_keys(key, 8)))
    np.testing.assert_array_equal(np.asarray(per_row), np.asarray(want))
    raw = jax.random.PRNGKey(2)
    np.testing.assert_array_equal(np.asarray(prune.select(method, feats, **dict(kw, key=prune.row_keys(raw, 8)))),
                                  np.asarray(prune.select(method, feats, **dict(kw, key=raw))))
