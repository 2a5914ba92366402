"""SparseVLM: prune visual tokens inside the LLM by text-rater attention, recycle part of the pruned ones by clustering.

Axes: ... leading batch axes (every public function maps over them row by row; a row is one image), A text tokens
after the image, N visual tokens of the current visual segment, D width, S sequence keys, H / Hkv query / key-value
heads, Dh head width, K kept (static bound), M recycled tokens (static bound), C clusters (static bound).

    raters = sparsevlm.text_raters(embeds_visual, embeds_text, visual_valid=vv, text_valid=tv)   # before layer 0
    attn = sparsevlm.rater_attention(q_text, k, visual=vis_pos, ...)    # layer p's queries/keys (its input)
    out = sparsevlm.prune_step(attn, raters, hidden_after_p, vv, max_keep=bounds[i].keep,
                               max_deleted=bounds[i].deleted, scale=step.scale, bias=step.bias)   # or count=
    seg = sparsevlm.assemble(hidden_after_p, out)   # new visual segment, valid first; slice to bounds[i].visual_out

Official code: Gumpest/SparseVLMs v1 @91fb6d9 (unchanged through b72c5d6), v1.5 @535f8ba:
llava/model/language_model/modelling_sparse_llama.py, score.py, utils.py. Not a `tops_jax.prune.METHODS` entry (the
kept count is data dependent and merged tokens have no source index). What the official code computes, the wiring
into a model, the schedules and the deviations: tops_jax/METHODS.md#sparsevlm.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import dpc_knn
from tops_jax import greedy
from tops_jax import relevance

__all__ = ["Step", "Schedule", "Sizes", "Clusters", "Recycled", "Pruned", "Segment",
           "step_sizes", "sizes", "text_raters", "rater_attention", "visual_scores", "attention_rank",
           "rank_keep_count", "fixed_keep_count", "select_kept", "recycle_counts", "cluster_merge", "recycle",
           "prune_step", "assemble"]

# int(n_deleted * 0.3) + 1 deleted tokens are recycled (computed as 3 n // 10 + 1, equal for every n < 10^5)
CLUSTER_DIVISOR = 10     # int(n_recycled / 10) + 1 clusters
DENSITY_NOISE = 1e-6     # density += uniform[0, 1) * 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST
Clusters = dpc_knn.Clusters  # re-exported: `cluster_merge` returns it


# ------------------------------------------------------------------------------------------------ schedules


class Step(NamedTuple):
  """One official pruning step.

  layer: 0-based decoder layer whose attention scores the step; the tokens leave its output (before layer + 1).
  count: v1.5, visual tokens kept: min(count, N - 1).
  scale, bias: v1, kept = min(int(rank * scale + bias), N - 1) unless rank == N.
  """
  layer: int
  count: int | None = None
  scale: float | None = None
  bias: float | None = None


class Schedule(NamedTuple):
  """An official setting: `steps` in layer order, `source` the file it was read from."""
  family: str
  version: str
  budget: int             # the target: the official "equal token number", mean visual tokens per decoder layer
  steps: tuple[Step, ...]
  source: str


class Sizes(NamedTuple):
  """Static bounds of one step over every reachable input.

  keep: the kept count (`prune_step(max_keep=)`); deleted: the deleted count (`prune_step(max_deleted=)`);
  recycled, clusters: what `recycle` then allots (M, C); visual_out: the valid rows of the new segment, i.e. the N of
  the next step (`assemble` returns keep + clusters rows, valid first: slice them to visual_out).
  """
  keep: int
  deleted: int
  recycled: int
  clusters: int
  visual_out: int


def _py_counts(deleted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  rec = np.where(deleted > 0, (3 * deleted) // 10 + 1, 0)
  return rec, np.where(rec > 0, rec // CLUSTER_DIVISOR + 1, 0)


def step_sizes(step: Step, num_visual: int, num_text: int) -> Sizes:
  """Exact bounds over every N <= num_visual visual and rank <= min(num_text, N) (v1) of one step."""
  nv, nt = _static_int("step_sizes", "num_visual", num_visual, 1), _static_int("step_sizes", "num_text", num_text, 0)
  count, scale, bias = _check_mode("step_sizes", step.count, step.scale, step.bias)
  n = np.arange(nv + 1)[:, None]
  if count is not None:
    kept = np.where(n == 0, 0, np.minimum(count, n - 1))
    ok = np.ones_like(kept, bool)
  else:
    r = np.arange(min(nt, nv) + 1)[None, :]
    table = _int_table(scale, bias, min(nt, nv))[None, :]
    kept = np.where(r == n, n, np.maximum(np.minimum(table, n - 1), 0))
    ok = r <= np.minimum(n, nt)
  deleted = np.broadcast_to(n - kept, ok.shape)
  rec, clusters = _py_counts(deleted)
  return Sizes(int(np.broadcast_to(kept, ok.shape)[ok].max()), int(max(deleted[ok].max(), 1)),
               int(max(rec[ok].max(), 1)), int(max(clusters[ok].max(), 1)),
               int(np.broadcast_to(kept + clusters, ok.shape)[ok].max()))


def sizes(plan: Schedule | tuple[Step, ...], num_visual: int, num_text: int) -> tuple[Sizes, ...]:
  """`step_sizes` chained through the steps: each step's N is the previous step's visual_out."""
  steps = plan.steps if isinstance(plan, Schedule) else tuple(plan)
  out = []
  for step in steps:
    out.append(step_sizes(step, num_visual, num_text))
    num_visual = max(out[-1].visual_out, 1)
  return tuple(out)


# ------------------------------------------------------------------------------------------------ checks


def _shape(x):
  return tuple(np.shape(x))


def _fail(fn: str, msg: str):
  raise ValueError(f"sparsevlm.{fn}: {msg}")


def _static_int(fn, name, value, lo, hi=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    _fail(fn, f"{name} must be a static Python int, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    _fail(fn, f"{name}={value} must lie in [{lo}, {'inf' if hi is None else hi}]")
  return int(value)


def _static_float(fn, name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
    _fail(fn, f"{name} must be a finite static Python number, got {value!r}")
  return float(value)


def _check_array(fn, name, x, *, rank, kind):
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    _fail(fn, f"{name} must be an array, got {type(x).__name__}")
  if len(_shape(x)) < rank:
    _fail(fn, f"{name} needs at least {rank} axes, got shape {_shape(x)}")
  dt = jnp.result_type(x)
  if kind == "float" and not jnp.issubdtype(dt, jnp.floating):
    _fail(fn, f"{name} must be floating point, got dtype {dt}")
  if kind == "bool" and dt != jnp.bool_:
    _fail(fn, f"{name} must be a bool mask, got dtype {dt}")
  if kind == "int" and not jnp.issubdtype(dt, jnp.integer):
    _fail(fn, f"{name} must hold integers, got dtype {dt}")


def _check_like(fn, name, x, shape, kind):
  if x is None:
    return
  _check_array(fn, name, x, rank=len(shape), kind=kind)
  if _shape(x) != tuple(shape):
    _fail(fn, f"{name} must have shape {tuple(shape)}, got {_shape(x)}")


def _int_arg(fn, name, x, shape):
  """A per-row integer: a Python int or int[...] of `shape` (a rank-0 array broadcasts) -> int32[shape]."""
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return jnp.full(shape, x, jnp.int32)
  _check_array(fn, name, x, rank=0, kind="int")
  if _shape(x) not in ((), tuple(shape)):
    _fail(fn, f"{name} must be an int or int[{', '.join(map(str, shape))}], got shape {_shape(x)}")
  return jnp.broadcast_to(jnp.asarray(x), shape).astype(jnp.int32)


def _check_mode(fn, count, scale, bias):
  if count is not None:
    if scale is not None or bias is not None:
      _fail(fn, "give count (v1.5) or scale and bias (v1), not both")
    return _static_int(fn, "count", count, 0), None, None
  if scale is None or bias is None:
    _fail(fn, "needs count= (v1.5) or both scale= and bias= (v1)")
  return None, _static_float(fn, "scale", scale), _static_float(fn, "bias", bias)


def _int_table(scale: float, bias: float, max_rank: int) -> np.ndarray:
  """int(r * scale + bias) for r = 0..max_rank, Python float64 arithmetic and truncation as the official code."""
  return np.array([int(r * scale + bias) for r in range(max_rank + 1)], dtype=np.int64)


# ------------------------------------------------------------------------------------------------ row mapping


def _map_rows(fn, lead, *args):
  """Applies the one-row `fn` over the leading axes `lead` of every array in `args` (None passes through)."""
  if not lead:
    return fn(*args)
  size = int(np.prod(lead))
  flat = [None if a is None else a.reshape((size,) + a.shape[len(lead):]) for a in args]
  out = jax.vmap(fn, in_axes=[None if a is None else 0 for a in flat])(*flat)
  return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _noise(key, lead, m_max):
  """Density noise float32[..., M] from `key` (None -> None); batched rows use fold_in(key, row)."""
  if key is None:
    return None
  if not lead:
    return DENSITY_NOISE * jax.random.uniform(key, (m_max,), jnp.float32)
  size = int(np.prod(lead))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size))
  noise = jax.vmap(lambda k: DENSITY_NOISE * jax.random.uniform(k, (m_max,), jnp.float32))(keys)
  return noise.reshape(lead + (m_max,))


@functools.partial(jax.jit, static_argnames=("kind", "n_lead", "params"))
def _run(args, key, *, kind, n_lead, params):
  """Maps the row function `_ROWS[kind]` (static keyword arguments `params`) over `n_lead` leading axes.

  One jitted program per (kind, params, shapes), so eager calls of the public functions compile once. Rows that
  take density noise (`m_max` in params) get it from `key` as their last argument.
  """
  params = dict(params)
  lead = next(a for a in args if a is not None).shape[:n_lead]
  if "m_max" in params:
    args = (*args, _noise(key, lead, params["m_max"]))
  return _map_rows(functools.partial(_ROWS[kind], **params), lead, *args)


# ------------------------------------------------------------------------------------------------ raters, scores


def text_raters(visual: jax.Array, text: jax.Array, *, visual_valid: jax.Array | None = None,
                text_valid: jax.Array | None = None) -> jax.Array:
  """SparseVLM's raters from the LLM input embeddings (computed once, before layer 0).

  visual: float[..., N, D] the image's input embeddings (projector outputs), text: float[..., A, D] the input
  embeddings of every token after the image; masks bool[..., N] / bool[..., A]. Returns bool[..., A]: valid text
  tokens whose `relevance.sparsevlm_rater_scores` is strictly above its mean over valid text tokens (every valid
  text token when none is).
  """
  scores = relevance.sparsevlm_rater_scores(visual, text, visual_valid=visual_valid, text_valid=text_valid)
  return relevance.select_raters(scores, text_valid)


def rater_attention(q_text: jax.Array, k: jax.Array, *, visual: jax.Array, scale: float | None = None,
                    kv_valid: jax.Array | None = None, text_valid: jax.Array | None = None,
                    visual_valid: jax.Array | None = None, q_positions: jax.Array | None = None,
                    k_positions: jax.Array | None = None) -> jax.Array:
  """The text -> visual block of one layer's attention map, mean over heads: what `P` is cut from
  (`relevance.text_visual_attention`, whose arguments it takes). Returns float32[..., A, N]; invalid text rows and
  invalid visual columns are 0."""
  return relevance.text_visual_attention(q_text, k, visual=visual, scale=scale, kv_valid=kv_valid,
                                         text_valid=text_valid, visual_valid=visual_valid, q_positions=q_positions,
                                         k_positions=k_positions, name="sparsevlm.rater_attention")


def _check_block(fn, attn, raters, visual_valid):
  _check_array(fn, "attn", attn, rank=2, kind="float")
  *lead, a, n = _shape(attn)
  _check_like(fn, "raters", raters, (*lead, a), "bool")
  _check_like(fn, "visual_valid", visual_valid, (*lead, n), "bool")
  return tuple(lead), a, n


def _valid(visual_valid, n):
  return jnp.ones((n,), bool) if visual_valid is None else visual_valid


def _scores_row(attn, raters, valid):
  valid = _valid(valid, attn.shape[-1])
  w = raters.astype(jnp.float32) / jnp.maximum(jnp.sum(raters), 1)
  s = jnp.einsum("t,tn->n", w, attn.astype(jnp.float32), precision=_HIGHEST)
  return jnp.where(valid, s, 0.0)


def visual_scores(attn: jax.Array, raters: jax.Array, visual_valid: jax.Array | None = None) -> jax.Array:
  """Official `relation_vis_text.mean(1)`: each visual token's head-averaged attention, mean over the raters.

  attn: float[..., A, N] (`rater_attention`), raters: bool[..., A], visual_valid: bool[..., N] ->
  float32[..., N] (0 at padding).
  """
  lead, _, _ = _check_block("visual_scores", attn, raters, visual_valid)
  return _run((attn, raters, visual_valid), None, kind="scores", n_lead=len(lead), params=())


def _rank_row(attn, raters, valid):
  valid = _valid(valid, attn.shape[-1])
  p = jnp.where(raters[:, None] & valid[None, :], attn.astype(jnp.float32), 0.0)
  if p.shape[0] > p.shape[1]:
    p = p.T
  sv = jnp.linalg.svd(p, compute_uv=False)
  # torch.linalg.matrix_rank's default: rtol = eps * max(rows, cols) of the real block (padding adds only zeros).
  dims = jnp.maximum(jnp.sum(raters), jnp.sum(valid)).astype(jnp.float32)
  tol = jnp.max(sv, initial=0.0) * dims * jnp.finfo(jnp.float32).eps
  return jnp.sum(sv > tol).astype(jnp.int32)


def attention_rank(attn: jax.Array, raters: jax.Array, visual_valid: jax.Array | None = None) -> jax.Array:
  """Official `torch.linalg.matrix_rank(P.float())`, P = the raters x valid visual block of `attn`.

  attn: float[..., A, N], raters: bool[..., A], visual_valid: bool[..., N] -> int32[...]. Singular values count
  when above sigma_max * max(#raters, #valid visual) * eps(float32).
  """
  lead, _, _ = _check_block("attention_rank", attn, raters, visual_valid)
  return _run((attn, raters, visual_valid), None, kind="rank", n_lead=len(lead), params=())


# ------------------------------------------------------------------------------------------------ counts


def _rank_count(rank, num_visual, table):
  r = jnp.clip(rank, 0, table.shape[0] - 1)
  kept = jnp.maximum(jnp.minimum(jnp.asarray(table, jnp.int32)[r], num_visual - 1), 0)
  return jnp.where(rank == num_visual, num_visual, kept).astype(jnp.int32)


def _fixed_count(num_visual, count):
  return jnp.where(num_visual == 0, 0, jnp.minimum(count, num_visual - 1)).astype(jnp.int32)


def rank_keep_count(rank: jax.Array, num_visual: jax.Array, *, scale: float, bias: float,
                    max_rank: int) -> jax.Array:
  """v1 kept count: num_visual when rank == num_visual, else min(int(rank * scale + bias), num_visual - 1).

  rank, num_visual: int[...] (same shape); scale, bias: static numbers; max_rank: static bound on `rank` (e.g.
  min(A, N)), the size of the exact Python-arithmetic table int(r * scale + bias). Returns int32[...] >= 0.
  The number deleted is num_visual - kept.
  """
  fn = "rank_keep_count"
  shape = _shape(rank) if hasattr(rank, "shape") else _shape(num_visual)
  rank, num_visual = _int_arg(fn, "rank", rank, shape), _int_arg(fn, "num_visual", num_visual, shape)
  table = _int_table(_static_float(fn, "scale", scale), _static_float(fn, "bias", bias),
                     _static_int(fn, "max_rank", max_rank, 0))
  return _rank_count(rank, num_visual, table)


def fixed_keep_count(num_visual: jax.Array, *, count: int) -> jax.Array:
  """v1.5 kept count: min(count, num_visual - 1), 0 when num_visual == 0. int[...] -> int32[...]."""
  num_visual = _int_arg("fixed_keep_count", "num_visual", num_visual, _shape(num_visual))
  return _fixed_count(num_visual, _static_int("fixed_keep_count", "count", count, 0))


def recycle_counts(num_deleted: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(recycled, clusters) int32[...]: int(d * 0.3) + 1 and int(recycled / 10) + 1, both 0 when d == 0.

  Integer forms 3d // 10 and m // 10 equal the official float64 expressions (checked for every d < 10^5).
  """
  d = _int_arg("recycle_counts", "num_deleted", num_deleted, _shape(num_deleted))
  rec = jnp.where(d > 0, (3 * d) // 10 + 1, 0)
  return rec, jnp.where(rec > 0, rec // CLUSTER_DIVISOR + 1, 0).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ selection


def _select_row(scores, count, valid, *, max_keep):
  n = scores.shape[0]
  scores, valid = scores.astype(jnp.float32), _valid(valid, n)
  order = greedy.topk_order(jnp.where(valid, scores, -jnp.inf), valid, max_keep)
  count = jnp.minimum(jnp.minimum(count, jnp.sum(valid)), max_keep)
  slot_ok = jnp.arange(max_keep) < count
  kept = jnp.sort(jnp.where(slot_ok, order, n)).astype(jnp.int32)
  return kept, kept < n


def select_kept(scores: jax.Array, count: jax.Array, visual_valid: jax.Array | None = None, *,
                max_keep: int) -> tuple[jax.Array, jax.Array]:
  """The `count` best-scored valid visual tokens, in ascending index order.

  scores: float[..., N], count: int[...] (<= max_keep; larger is cut), visual_valid: bool[..., N], max_keep: static
  K <= N. Returns (kept int32[..., K], kept_valid bool[..., K]): the kept indices ascending in the first `count`
  slots, then N (one past the last index) in the invalid slots. Equal scores go to the lowest index.
  """
  fn = "select_kept"
  _check_array(fn, "scores", scores, rank=1, kind="float")
  *lead, n = _shape(scores)
  count = _int_arg(fn, "count", count, tuple(lead))
  _check_like(fn, "visual_valid", visual_valid, (*lead, n), "bool")
  keep = _static_int(fn, "max_keep", max_keep, 0, n)
  return _run((scores, count, visual_valid), None, kind="select", n_lead=len(lead), params=(("max_keep", keep),))


# ------------------------------------------------------------------------------------------------ recycling


def cluster_merge(x: jax.Array, num_clusters: jax.Array, valid: jax.Array | None = None, *, max_clusters: int,
                  density_noise: jax.Array | None = None) -> Clusters:
  """Official `cluster_and_merge` (DPC-KNN, k nearest = number of clusters, mean merge) with dynamic counts.

  x: float[..., M, D] tokens in the official recycled order (order decides ties); num_clusters: int[...] C <= the
  valid tokens and <= max_clusters (cut otherwise); valid: bool[..., M]; max_clusters: static C_max <= M;
  density_noise: float[..., M] added to the density as is (the official value is uniform[0, 1) * 1e-6), or None.
  """
  fn = "cluster_merge"
  _check_array(fn, "x", x, rank=2, kind="float")
  *lead, m, _ = _shape(x)
  num_clusters = _int_arg(fn, "num_clusters", num_clusters, tuple(lead))
  _check_like(fn, "valid", valid, (*lead, m), "bool")
  _check_like(fn, "density_noise", density_noise, (*lead, m), "float")
  c = _static_int(fn, "max_clusters", max_clusters, 1, m)
  return _run((x, num_clusters, valid, density_noise), None, kind="cluster", n_lead=len(lead),
              params=(("max_clusters", c),))


class Recycled(NamedTuple):
  """Recycled tokens of one step (official order) and their merged clusters."""
  tokens: jax.Array        # float[..., C, D] merged tokens in center order, zeros in invalid slots
  valid: jax.Array         # bool[..., C]
  centers: jax.Array       # int32[..., C] visual index of each cluster's center; N in invalid slots
  members: jax.Array       # int32[..., M] visual indices of the recycled tokens, best score first; N when invalid
  member_valid: jax.Array  # bool[..., M]
  assignment: jax.Array    # int32[..., M] cluster slot of each member; -1 when invalid


def _recycle_bounds(n: int, max_deleted: int | None) -> tuple[int, int]:
  d = n if max_deleted is None else max_deleted
  m_max = min((3 * d) // 10 + 1, n)
  return m_max, m_max // CLUSTER_DIVISOR + 1


def _recycle_row(hidden, scores, deleted, noise, *, m_max, c_max):
  n = deleted.shape[0]
  scores = scores.astype(jnp.float32)
  n_del = jnp.sum(deleted).astype(jnp.int32)
  m = jnp.minimum(jnp.where(n_del > 0, (3 * n_del) // 10 + 1, 0), m_max)
  c = jnp.where(m > 0, m // CLUSTER_DIVISOR + 1, 0)
  members = greedy.topk_order(jnp.where(deleted, scores, -jnp.inf), deleted, m_max)
  member_ok = jnp.arange(m_max) < m
  cl = dpc_knn.cluster_row(hidden[members], c, member_ok, noise, max_clusters=c_max)
  centers = jnp.where(cl.valid, members[jnp.minimum(cl.centers, m_max - 1)], n).astype(jnp.int32)
  return Recycled(cl.tokens, cl.valid, centers, jnp.where(member_ok, members, n).astype(jnp.int32), member_ok,
                  cl.assignment)


def recycle(hidden: jax.Array, scores: jax.Array, deleted: jax.Array, *, max_deleted: int | None = None,
            key: jax.Array | None = None) -> Recycled:
  """Official recycling: the best int(0.3 d) + 1 of the d deleted tokens by score, merged by `cluster_merge`.

  hidden: float[..., N, D] the visual tokens' hidden states OUTPUT by the pruning layer; scores: float[..., N]
  (`visual_scores`); deleted: bool[..., N] valid tokens not kept; max_deleted: static bound on d (default N), which
  sets M = min(int(0.3 * max_deleted) + 1, N) and C = int(M / 10) + 1; key: density noise (see the module
  docstring) or None.
  """
  fn = "recycle"
  _check_array(fn, "hidden", hidden, rank=2, kind="float")
  *lead, n, _ = _shape(hidden)
  _check_like(fn, "scores", scores, (*lead, n), "float")
  _check_like(fn, "deleted", deleted, (*lead, n), "bool")
  if n == 0:
    _fail(fn, "hidden has no visual tokens (N = 0)")
  m_max, c_max = _recycle_bounds(n, None if max_deleted is None else _static_int(fn, "max_deleted", max_deleted, 1, n))
  return _run((hidden, scores, deleted), key, kind="recycle", n_lead=len(lead),
              params=(("c_max", c_max), ("m_max", m_max)))


# ------------------------------------------------------------------------------------------------ one step


class Pruned(NamedTuple):
  """One SparseVLM step over the current visual tokens."""
  kept: jax.Array        # int32[..., K] kept visual indices ascending; N in invalid slots
  kept_valid: jax.Array  # bool[..., K]
  num_kept: jax.Array    # int32[...]
  rank: jax.Array        # int32[...] rank of the raters x visual block (v1); -1 with a fixed count (v1.5)
  scores: jax.Array      # float32[..., N] visual scores (mean rater attention), 0 at padding
  recycled: Recycled


def prune_step(attn: jax.Array, raters: jax.Array, hidden: jax.Array, visual_valid: jax.Array | None = None, *,
               max_keep: int, count: int | None = None, scale: float | None = None, bias: float | None = None,
               max_deleted: int | None = None, key: jax.Array | None = None) -> Pruned:
  """One official pruning step: scores, kept count (v1 rank based or v1.5 fixed), top-k, recycling.

  Args:
    attn: float[..., A, N] head-averaged attention of the text tokens after the image to the current visual tokens
      at the pruning layer (`rater_attention`).
    raters: bool[..., A] (`text_raters`, computed once before layer 0).
    hidden: float[..., N, D] the visual tokens' hidden states output by the pruning layer.
    visual_valid: bool[..., N] padding False.
    max_keep: static K, a bound on the kept count (`step_sizes(...).keep`).
    count: v1.5 fixed count; or scale, bias: v1 (static numbers).
    max_deleted: static bound on the deleted count (default N); sets the recycled and cluster bounds.
    key: density noise of the clustering, or None.

  Returns:
    `Pruned`. Recycling happens exactly when a token is deleted (num_kept < number of valid tokens).
  """
  fn = "prune_step"
  lead, a, n = _check_block(fn, attn, raters, visual_valid)
  _check_array(fn, "hidden", hidden, rank=2, kind="float")
  if _shape(hidden)[:-1] != (*lead, n):
    _fail(fn, f"hidden must be float[..., N, D] with leading shape {(*lead, n)}, got {_shape(hidden)}")
  if n == 0:
    _fail(fn, "attn has no visual tokens (N = 0)")
  count, scale, bias = _check_mode(fn, count, scale, bias)
  keep = _static_int(fn, "max_keep", max_keep, 0, n)
  m_max, c_max = _recycle_bounds(n, None if max_deleted is None else _static_int(fn, "max_deleted", max_deleted, 1, n))
  table = None if count is not None else tuple(_int_table(scale, bias, min(a, n)).tolist())
  params = (("c_max", c_max), ("count", count), ("m_max", m_max), ("max_keep", keep), ("table", table))
  return _run((attn, raters, hidden, visual_valid), key, kind="step", n_lead=len(lead), params=params)


def _step_row(attn, raters, hidden, valid, noise, *, max_keep, count, table, m_max, c_max):
  n = attn.shape[-1]
  valid = _valid(valid, n)
  scores = _scores_row(attn, raters, valid)
  n_valid = jnp.sum(valid).astype(jnp.int32)
  if table is None:
    rank = jnp.int32(-1)
    kept_n = _fixed_count(n_valid, count)
  else:
    rank = _rank_row(attn, raters, valid)
    kept_n = _rank_count(rank, n_valid, np.asarray(table))
  kept, kept_ok = _select_row(scores, kept_n, valid, max_keep=max_keep)
  kept_mask = jnp.zeros((n,), bool).at[kept].set(kept_ok, mode="drop")
  rec = _recycle_row(hidden, scores, valid & ~kept_mask, noise, m_max=m_max, c_max=c_max)
  return Pruned(kept, kept_ok, jnp.sum(kept_ok).astype(jnp.int32), rank, scores, rec)


class Segment(NamedTuple):
  """The new visual segment, valid rows first in the official order [kept ascending; merged in center order]."""
  tokens: jax.Array  # float[..., K + C, D] (zeros in invalid rows)
  valid: jax.Array   # bool[..., K + C]
  origin: jax.Array  # int32[..., K + C]: i < N kept visual token i; N + c merged cluster c; -1 invalid


def _assemble_row(hidden, kept, kept_ok, merged, merged_ok):
  n = hidden.shape[0]
  kept_tokens = jnp.where(kept_ok[:, None], hidden[jnp.minimum(kept, n - 1)], 0)
  tokens = jnp.concatenate([kept_tokens.astype(hidden.dtype), merged.astype(hidden.dtype)])
  valid = jnp.concatenate([kept_ok, merged_ok])
  origin = jnp.concatenate([jnp.where(kept_ok, kept, -1),
                            jnp.where(merged_ok, n + jnp.arange(merged_ok.shape[0]), -1)]).astype(jnp.int32)
  perm = jnp.argsort(~valid, stable=True)
  return Segment(tokens[perm], valid[perm], origin[perm])


def assemble(hidden: jax.Array, pruned: Pruned) -> Segment:
  """hidden: float[..., N, D] (as given to `prune_step`), pruned: its result -> `Segment` of K + C rows."""
  _check_array("assemble", "hidden", hidden, rank=2, kind="float")
  lead = _shape(hidden)[:-2]
  if _shape(pruned.kept)[:-1] != lead:
    _fail("assemble", f"pruned has leading shape {_shape(pruned.kept)[:-1]}, hidden {lead}")
  return _run((hidden, pruned.kept, pruned.kept_valid, pruned.recycled.tokens, pruned.recycled.valid), None,
              kind="assemble", n_lead=len(lead), params=())


_ROWS = {"scores": _scores_row, "rank": _rank_row, "select": _select_row, "cluster": dpc_knn.cluster_row,
         "recycle": _recycle_row, "step": _step_row, "assemble": _assemble_row}
