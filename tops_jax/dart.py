"""DART: keep a few pivot tokens and, for each pivot, the tokens that duplicate it least.

Axes: N visual tokens, D width, Dk key width, T text tokens, P pivots, K kept.

Source: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", EMNLP 2025), official code `ZichenWen1/DART` (LLaVA: `get_retained_image_token` and the `DART_K_norm`
decoder loop, the eval scripts `scripts/v1_5/eval/*.sh`, `scripts/v1_6/eval/*.sh`; read from indexed copies of those
files: no snapshot of the repository could be fetched, so no commit is known) and the llmc port (`ModelTC/llmc`
llmc/compression/token_reduction/dart.py, `get_retained_image_token`, commit 05eedff08c58ce5a3a4e2e879133bc922dff6ff5),
which computes the same. Facts read from that code:
- Pruning happens before LLM layer K = 2. Pivots are the `pivot_image_token = 4` visual tokens with the largest L1
  norm of their layer K - 1 keys (after RoPE, heads concatenated), `topk` order, plus `pivot_text_token = 4` tokens
  chosen the same way among ALL the tokens after the image.
- Similarity is the cosine of the hidden states entering layer K passed through the model's final RMSNorm.
- The pivots are visited in the iteration order of a Python `set` of their SEQUENCE POSITIONS
  (`set(image_indices + query_indices)`, then `list(tmp_set)` of its copy): text pivots are visited too. For each
  pivot, the TOKEN_TOPK candidates with the lowest cosine similarity to it are kept and leave the candidate set;
  candidates are the visual tokens that are not visual pivots. Text pivots are removed from the kept set at the end,
  so the kept visual tokens are the visual pivots plus every pick, and the surviving sequence is sorted by position.
- TOKEN_TOPK = int(max_num_trunction // (pivot_image_token + pivot_text_token)) with max_num_trunction = the budget
  B (the scripts run `0.778 128`, ...); the kept count is therefore 4 + 8 * (B // 8), which can EXCEED the budget:
  68 / 132 / 196 for B = 64 / 128 / 192. LLaVA-NeXT branch (`config.text_length` set): TOKEN_TOPK =
  min(retain_token_num_for_llava_next, L - 4) // 8 over all L image tokens of the sequence (newlines included),
  i.e. 644 / 324 / 164 for 640 / 320 / 160 (not verified: the v1_6 scripts read here pass only max_num_trunction,
  and the argument default of retain_token_num_for_llava_next is 0; ZichenWen1/DART issue #18 asks the same).
  llmc, when max_num_trunction is None, uses ceil((N * (1 - ratio)) // 8).
  `kept_count` returns these counts; the caller uses it as the static `keep`.

API. `order(features, relevance, valid, key, *, keep, ...)` (registered as "dart" in `tops_jax.prune`):
`features` is the similarity space (the normed layer-K input states), `keys` (float[N, Dk], default the features)
only choose the visual pivots; the text pivots are optional: `text_features` float[T, D] with `text_keys`
float[T, Dk] (default the text features) and `text_valid` bool[T]. `positions` int32[N] / `text_positions` int32[T]
are the tokens' positions in the unpadded prompt sequence (default: the image starts at 0 and the text follows it);
they matter only for the official visiting order.
- pivot_order="official" (default): pivots are visited in CPython's set iteration order of their positions,
  reproduced exactly by `set_iteration_order` (open addressing, LINEAR_PROBES = 9, PERTURB_SHIFT = 5, growth to
  used * 4 at 3/5 fill, and the `copy()` of the official code; checked against CPython 3.11 `set`). "norm": visual
  pivots first, in descending key norm, then text pivots (this module's order before it followed the official one).
- The `keep - P` picks are shared over the visited pivots: pick quota (keep - P) // pivots, the first
  (keep - P) % pivots pivots in visiting order take one more. With keep = `kept_count(B)` (count="official") every
  pivot takes exactly TOKEN_TOPK, as the official loop; `kept_count(B, count="exact")` = B keeps exactly the budget
  (the behaviour before this module followed the official count: a fixed budget makes methods comparable token for
  token).

Deviations and choices where the code is silent:
- Ties (equal norms, equal similarities) go to the lowest index (torch.topk leaves them unspecified; the official
  candidate list, `list(set(range(...)))`, is in ascending position order).
- Float32 similarities and norms (the official code runs in float16 on the GPU): near-ties may break differently.
- Padding is never a pivot, never picked and never a text pivot. With fewer than `text_pivots` valid text tokens
  (the official code raises in `topk`) the pivots that exist are visited and share the picks. If an outer jit hides
  that fewer than K visual tokens are valid, the last slots hold the lowest-index unused padding (the official
  `topk` raises).
- Positions must be distinct non-negative ints below 2**30 (CPython's int hash is the identity there).
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
  """Static number of visual tokens DART keeps for `budget` (the official max_num_trunction): the `keep` to use.

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


def _static_capacity(m: int) -> int:
  """The largest table any count <= m of elements reaches (growth while inserting, and the copy)."""
  def size(minused):
    s = _MIN_SIZE
    while s <= minused:
      s <<= 1
    return s
  cap, table = _MIN_SIZE, _MIN_SIZE
  for fill in range(1, m + 1):
    if fill * 5 >= (table - 1) * 3:
      table = size(fill * 4)
    cap = max(cap, table, size(2 * fill))
  return cap


def _insert(table, mask, hashes, row, ok):
  """Puts `row` (whose hash is hashes[row]) in the first free slot of CPython's probe sequence, when `ok`."""
  cap = table.shape[0]
  lanes = jnp.arange(_LINEAR_PROBES + 1, dtype=jnp.int32)
  h = jnp.where(ok, hashes[jnp.maximum(row, 0)], 0)

  def body(state):
    i, perturb, _, _ = state
    linear = i + _LINEAR_PROBES <= mask
    idx = jnp.minimum(i + lanes, cap - 1)
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

  init = (jnp.full((_static_capacity(m),), _EMPTY, jnp.int32), jnp.int32(_MIN_SIZE - 1), jnp.int32(0))
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
    keep: static number of kept tokens K; `kept_count(budget)` for the official count.
    pivots: static number of visual pivots P (official 4); min(P, K) are used.
    keys: float[N, Dk] visual keys whose L1 norm picks the pivots (default `features`).
    text_features: float[T, D] text states in the same space, or None for visual pivots only.
    text_keys: float[T, Dk] text keys for the text pivots (default `text_features`).
    text_valid: bool[T] real text tokens (default all).
    text_pivots: static number of text pivots (official 4); used only with `text_features`.
    positions: int[N] positions of the visual tokens in the unpadded sequence (default 0..N-1).
    text_positions: int[T] positions of the text tokens (default N..N+T-1).
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
      raise ValueError(f"dart: text_features must be float[T, D={features.shape[1]}], "
                       f"got shape {tuple(jnp.shape(text_features))}")
    t = text_features.shape[0]
    _check("text_keys", text_keys, t, f"float[T={t}, Dk]")
    _check_positions("text_positions", text_positions, t)
    tv = jnp.ones(t, dtype=bool) if text_valid is None else text_valid
    if jnp.shape(tv) != (t,) or jnp.result_type(tv) != jnp.bool_:
      raise ValueError(f"dart: text_valid must be bool[T={t}], got {jnp.result_type(tv)}{tuple(jnp.shape(tv))}")
    tp = min(text_pivots, t)
    tnorm = _l1(text_features if text_keys is None else text_keys)
    text_idx = greedy.topk_order(jnp.where(tv, tnorm, -jnp.inf), tv, tp)     # valid text pivots come first
    rows.append(similarity.cosine_similarity(text_features[text_idx], features))
    tpos = (n + jnp.arange(t, dtype=jnp.int32) if text_positions is None
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
