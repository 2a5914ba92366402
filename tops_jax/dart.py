"""DART: keep a few pivot tokens and, for each pivot, the tokens that duplicate it least.

Axes: N visual tokens, D width, Dk key width, A text tokens (after the image), P pivots, K kept.

`order(features, relevance, valid, key, *, keep, ...)` is registered as "dart" in `tops_jax.prune`;
`kept_count(target)` gives the official kept count 4 + 8 * (target // 8) for the papers' token count (`count="exact"`:
the target), `set_iteration_order` the official pivot visiting order (CPython's set iteration order).

Official code: ZichenWen1/DART (`get_retained_image_token`, the `DART_K_norm` decoder loop, scripts/v1_5/eval/*.sh,
scripts/v1_6/eval/*.sh; no commit known) and the llmc port ModelTC/llmc @05eedff
llmc/compression/token_reduction/dart.py. Facts read from that code, the API in full and the deviations:
tops_jax/METHODS.md#dart.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import greedy
from tops_jax import similarity

__all__ = ["order", "kept_count", "set_iteration_order", "PIVOT_IMAGE_TOKENS", "PIVOT_TEXT_TOKENS", "PIVOT_ORDERS",
           "COUNTS"]

PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4
PIVOT_ORDERS = ("official", "norm")
COUNTS = ("official", "exact")

# CPython Objects/setobject.c: probe constants, initial table, growth rule (checked against CPython 3.11's `set`;
# the official environment, Python 3.10, has the same table code).
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5
_MIN_SIZE = 8
_EMPTY = -1


def kept_count(budget: int, *, count: str = "official", pivots: int = PIVOT_IMAGE_TOKENS,
               text_pivots: int = PIVOT_TEXT_TOKENS, num_tokens: int | None = None) -> int:
  """Static number of visual tokens DART keeps for the target `budget` (the papers' token count; the official
  max_num_trunction): the `keep` to use.

  count="official": pivots + (pivots + text_pivots) * TOKEN_TOPK with TOKEN_TOPK = budget // (pivots + text_pivots)
  (LLaVA-1.5: 64 -> 68, 128 -> 132, 192 -> 196); with `num_tokens` (the image tokens of the sequence, the official
  LLaVA-NeXT branch) TOKEN_TOPK = min(budget, num_tokens - pivots) // (pivots + text_pivots) (640 -> 644).
  count="exact": `budget` itself.
  """
  for name, value in (("budget", budget), ("pivots", pivots), ("text_pivots", text_pivots)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name != "text_pivots"
                                                                                        else 0):
      raise ValueError(f"dart: {name} must be a Python int >= {1 if name != 'text_pivots' else 0}, got {value!r}")
  if count not in COUNTS:
    raise ValueError(f"dart: count must be one of {COUNTS}, got {count!r}")
  if count == "exact":
    return int(budget)
  retain = int(budget)
  if num_tokens is not None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens <= pivots:
      raise ValueError(f"dart: num_tokens must be a Python int > pivots={pivots}, got {num_tokens!r}")
    retain = min(retain, int(num_tokens) - pivots)
  return int(pivots + (pivots + text_pivots) * (retain // (pivots + text_pivots)))


# --- CPython set iteration order ------------------------------------------------------------------------------------

def _table_size(minused):
  """Smallest power of two >= 8 strictly above `minused` (setobject.c set_table_resize), traced int32."""
  sizes = _MIN_SIZE << jnp.arange(26, dtype=jnp.int32)
  return jnp.min(jnp.where(sizes > minused, sizes, jnp.int32(2 ** 30)))


def _static_table_size(m: int) -> int:
  """The largest table any count <= m of elements reaches (growth while inserting, and the copy)."""
  def size(minused):
    s = _MIN_SIZE
    while s <= minused:
      s <<= 1
    return s
  largest, table = _MIN_SIZE, _MIN_SIZE
  for fill in range(1, m + 1):
    if fill * 5 >= (table - 1) * 3:
      table = size(fill * 4)
    largest = max(largest, table, size(2 * fill))
  return largest


def _insert(table, mask, hashes, row, ok):
  """Puts `row` (whose hash is hashes[row]) in the first free slot of CPython's probe sequence, when `ok`."""
  slots = table.shape[0]
  lanes = jnp.arange(_LINEAR_PROBES + 1, dtype=jnp.int32)
  h = jnp.where(ok, hashes[jnp.maximum(row, 0)], 0)

  def body(state):
    i, perturb, _, _ = state
    linear = i + _LINEAR_PROBES <= mask
    idx = jnp.minimum(i + lanes, slots - 1)
    free = ((lanes == 0) | linear) & (table[idx] == _EMPTY)
    found = jnp.any(free)
    perturb_next = perturb >> _PERTURB_SHIFT
    i_next = (i * 5 + 1 + perturb_next) & mask
    return (jnp.where(found, i, i_next), jnp.where(found, perturb, perturb_next), found,
            (i + jnp.argmax(free)).astype(jnp.int32))

  init = (h & mask, h, ~ok, jnp.int32(0))
  _, _, _, slot = jax.lax.while_loop(lambda s: ~s[2], body, init)
  return jnp.where(ok, table.at[slot].set(row), table)


def _rebuild(table, mask, hashes):
  """Reinserts the entries of `table` in slot order into an empty table of mask `mask` (resize, copy)."""
  def body(k, new):
    row = table[k]
    return _insert(new, mask, hashes, row, row != _EMPTY)
  return jax.lax.fori_loop(0, table.shape[0], body, jnp.full_like(table, _EMPTY))


def set_iteration_order(values: jax.Array, valid: jax.Array | None = None, *, copy: bool = True) -> jax.Array:
  """Where CPython iterates `set(values)` (then `.copy()` when `copy`, as the official DART loop does).

  values: int[M] distinct non-negative ints below 2**30, in insertion order; valid: bool[M] (invalid entries are
  not inserted). Returns int32[M]: the indices into `values` of the valid entries in iteration order, then -1.
  Static M; works under jit and vmap.
  """
  values = jnp.asarray(values)
  m = values.shape[0]
  valid = jnp.ones((m,), bool) if valid is None else jnp.asarray(valid)
  hashes = values.astype(jnp.int32)

  def add(row, state):
    table, mask, fill = state
    ok = valid[row]
    table = _insert(table, mask, hashes, row, ok)
    fill = fill + ok.astype(jnp.int32)
    grow = ok & (fill * 5 >= mask * 3)
    new_mask = _table_size(fill * 4) - 1
    table = jax.lax.cond(grow, lambda: _rebuild(table, new_mask, hashes), lambda: table)
    return table, jnp.where(grow, new_mask, mask), fill

  init = (jnp.full((_static_table_size(m),), _EMPTY, jnp.int32), jnp.int32(_MIN_SIZE - 1), jnp.int32(0))
  table, mask, fill = jax.lax.fori_loop(0, m, add, init)
  if copy:   # set_merge into an empty set: one resize to 2 * used first, slot-order reinsertion unless same size
    copy_mask = jnp.where(fill * 5 >= (_MIN_SIZE - 1) * 3, _table_size(2 * fill) - 1, _MIN_SIZE - 1)
    table = jax.lax.cond(copy_mask != mask, lambda: _rebuild(table, copy_mask, hashes), lambda: table)
  filled = table != _EMPTY
  slots = jnp.argsort(~filled, stable=True)[:m]
  return jnp.where(jnp.arange(m) < jnp.sum(filled), table[slots], -1).astype(jnp.int32)


# --- selection ------------------------------------------------------------------------------------------------------

class _Carry(NamedTuple):
  chosen: jax.Array   # bool[N]


def _l1(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(x.astype(jnp.float32)), axis=-1)


def _check(name: str, x, rows: int, what: str):
  if x is not None and (jnp.ndim(x) != 2 or x.shape[0] != rows):
    raise ValueError(f"dart: {name} must be {what}, got shape {tuple(jnp.shape(x))}")


def _check_positions(name: str, x, rows: int):
  if x is None:
    return
  if jnp.shape(x) != (rows,) or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    raise ValueError(f"dart: {name} must be int[{rows}] sequence positions, got "
                     f"{jnp.result_type(x)}{tuple(jnp.shape(x))}")


def _slot(step: jax.Array, picks: int, active: jax.Array) -> jax.Array:
  """Which visited pivot owns pick `step` when `picks` picks are shared by `active` pivots, earlier pivots first."""
  active = jnp.maximum(active, 1)
  base = picks // active
  extra = picks % active
  head = extra * (base + 1)
  return jnp.where(step < head, step // (base + 1), extra + (step - head) // jnp.maximum(base, 1))


def order(features: jax.Array, relevance: jax.Array | None, valid: jax.Array, key: jax.Array | None = None, *,
          keep: int, pivots: int = PIVOT_IMAGE_TOKENS, keys: jax.Array | None = None,
          text_features: jax.Array | None = None, text_keys: jax.Array | None = None,
          text_valid: jax.Array | None = None, text_pivots: int = PIVOT_TEXT_TOKENS,
          positions: jax.Array | None = None, text_positions: jax.Array | None = None,
          pivot_order: str = "official") -> jax.Array:
  """DART's kept tokens: visual pivots (descending key L1 norm), then the picks in pick order.

  Args:
    features: float[N, D] similarity space (DART: final-norm hidden states entering the pruning layer).
    relevance: unused (DART ranks by duplication, not importance).
    valid: bool[N] padding False.
    key: unused.
    keep: static number of kept tokens K; `kept_count(target)` for the official count.
    pivots: static number of visual pivots P (official 4); min(P, K) are used.
    keys: float[N, Dk] visual keys whose L1 norm picks the pivots (default `features`).
    text_features: float[A, D] text states in the same space, or None for visual pivots only.
    text_keys: float[A, Dk] text keys for the text pivots (default `text_features`).
    text_valid: bool[A] real text tokens (default all).
    text_pivots: static number of text pivots (official 4); used only with `text_features`.
    positions: int[N] positions of the visual tokens in the unpadded sequence (default 0..N-1).
    text_positions: int[A] positions of the text tokens (default N..N+A-1).
    pivot_order: "official" (CPython set order of the pivots' positions) or "norm" (visual, then text, by norm).

  Returns:
    int32[K].
  """
  del relevance, key
  n = features.shape[0]
  if isinstance(pivots, bool) or not isinstance(pivots, int) or pivots < 1:
    raise ValueError(f"dart: pivots must be a static int >= 1, got {pivots!r}")
  if isinstance(text_pivots, bool) or not isinstance(text_pivots, int) or text_pivots < 0:
    raise ValueError(f"dart: text_pivots must be a static int >= 0, got {text_pivots!r}")
  if pivot_order not in PIVOT_ORDERS:
    raise ValueError(f"dart: pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
  _check("keys", keys, n, f"float[N={n}, Dk]")
  _check_positions("positions", positions, n)
  if text_features is None and (text_keys is not None or text_valid is not None or text_positions is not None):
    raise ValueError("dart: text_keys / text_valid / text_positions need text_features")

  p = min(pivots, keep)
  norm = _l1(features if keys is None else keys)
  pivot_idx = greedy.topk_order(jnp.where(valid, norm, -jnp.inf), valid, p)
  rows = [similarity.cosine_similarity(features[pivot_idx], features)]         # float32[P, N]
  pos = jnp.arange(n, dtype=jnp.int32) if positions is None else jnp.asarray(positions).astype(jnp.int32)
  hashes = [pos[pivot_idx]]
  row_valid = [jnp.ones((p,), bool)]
  if text_features is not None and text_pivots > 0:
    if jnp.ndim(text_features) != 2 or text_features.shape[1] != features.shape[1]:
      raise ValueError(f"dart: text_features must be float[A, D={features.shape[1]}], "
                       f"got shape {tuple(jnp.shape(text_features))}")
    a = text_features.shape[0]
    _check("text_keys", text_keys, a, f"float[A={a}, Dk]")
    _check_positions("text_positions", text_positions, a)
    tv = jnp.ones(a, dtype=bool) if text_valid is None else text_valid
    if jnp.shape(tv) != (a,) or jnp.result_type(tv) != jnp.bool_:
      raise ValueError(f"dart: text_valid must be bool[A={a}], got {jnp.result_type(tv)}{tuple(jnp.shape(tv))}")
    tp = min(text_pivots, a)
    tnorm = _l1(text_features if text_keys is None else text_keys)
    text_idx = greedy.topk_order(jnp.where(tv, tnorm, -jnp.inf), tv, tp)     # valid text pivots come first
    rows.append(similarity.cosine_similarity(text_features[text_idx], features))
    tpos = (n + jnp.arange(a, dtype=jnp.int32) if text_positions is None
            else jnp.asarray(text_positions).astype(jnp.int32))
    hashes.append(tpos[text_idx])
    row_valid.append(tv[text_idx])
  sim = jnp.concatenate(rows)                                                  # float32[P + Pt, N]
  row_valid = jnp.concatenate(row_valid)
  active = jnp.sum(row_valid).astype(jnp.int32)
  if pivot_order == "official":
    visit = set_iteration_order(jnp.concatenate(hashes), row_valid)            # image pivots inserted first
  else:
    visit = jnp.argsort(~row_valid, stable=True).astype(jnp.int32)

  picks = keep - p
  if picks == 0:
    return pivot_idx
  idx = jnp.arange(n)
  chosen = jnp.zeros(n, dtype=bool).at[pivot_idx].set(True)

  def step(carry: _Carry, s):
    candidates = valid & ~carry.chosen
    row = visit[jnp.minimum(_slot(s, picks, active), sim.shape[0] - 1)]
    least_duplicate = greedy.masked_argmax(-sim[jnp.maximum(row, 0)], ~candidates)
    lowest_unused = greedy.masked_argmax(-idx.astype(jnp.float32), carry.chosen)
    pick = jnp.where(jnp.any(candidates), least_duplicate, lowest_unused)
    return _Carry(carry.chosen.at[pick].set(True)), pick

  _, picked = jax.lax.scan(step, _Carry(chosen), jnp.arange(picks))
  return jnp.concatenate([pivot_idx, picked.astype(jnp.int32)])
