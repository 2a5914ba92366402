"""Decoder self-attention on `jax.nn.dot_product_attention`, scheduled for the backend it runs on.

Axes (`models` legend): B batch, S query tokens, Sk key slots, H query heads, Hkv key/value heads (H % Hkv == 0),
G = H // Hkv query heads per key/value head, Dh head width, C rows of one query block.

Every attention in the decoder is `jax.nn.dot_product_attention`; what changes with the backend is how much of the
S x Sk score matrix one call sees:

- "xla": one call over the whole sequence with a bool[B, 1, S, Sk] mask (XLA's fused attention on GPU/TPU).
- "cudnn": implementation="cudnn" (flash attention on NVIDIA GPUs; cuDNN supports a subset of shapes and dtypes
  and raises otherwise). cuDNN takes no arbitrary mask: a causal prefill passes is_causal plus per-row lengths,
  which is exact for rows whose real tokens come first (no padding, or right padding); left-padded batches must use
  "xla". Unverified here (no GPU was lent; `scripts/gpu_bench.sh` checks it against "xla" first).
- "blocked" (the CPU schedule of a causal prefill, `causal`): flash attention written in jax.numpy. Queries in
  blocks of C rows (the G query heads of one key/value head stacked), each block against only the keys it can see
  ([0, end of block), or the sliding window) in tiles of C keys, with a running max and denominator (online
  softmax), one (row, key/value head) at a time under `lax.map`. Why not `jax.nn.dot_product_attention` here: XLA:CPU
  does not fuse the score matmul with the softmax, so one call over the whole sequence writes and re-reads the f32
  [B, H, S, Sk] scores (8 heads x 2,954^2 x 4 bytes = 280 MB per layer: 0.42 s per layer on this project's 2-core
  CPU, PyTorch's CPU flash kernel 0.05 s); calling it per query block and head is 0.15 s, and per tile with its
  logsumexp residuals merged 0.15 s too, while this loop is 0.08 s (BUILD.md "Speed"): its C x C tiles stay in
  cache and the tiles the causal mask hides are never computed. Same numbers as "xla" up to float rounding (every
  row's softmax sees exactly the same keys; tests/models/test_attention.py). The general masked case (a cache with
  earlier slots: decoding) takes the "xla" call.
- "auto": "blocked" on CPU, "xla" elsewhere: the platform of the mesh set with `jax.set_mesh` when there is one
  (a program compiled on this CPU for TPU devices, `experiments.tpu_compile`, gets TPU's schedule), else the default
  backend's.

Under a mesh whose batch axes (data, fsdp) split the rows, the "blocked" schedule runs in a `jax.shard_map` over them:
its `lax.map` walks (row, head) pairs, and GSPMD cannot split a loop over a sharded axis (it gathers every row's
queries, keys and values onto every device). Each device then maps over its own rows, the same per-pair work.

Masks are built from slots, never passed in as S x Sk tensors: a key slot is visible to a query when it holds a real
token, is not after the query's slot and, with a sliding window W, is fewer than W slots before it; every query sees
its own slot (see `visible`).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models import sharding

__all__ = ["IMPLEMENTATIONS", "resolve", "visible", "causal", "bidirectional", "masked", "with_cache", "BLOCK"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blocked")
BLOCK = 512     # query rows per block and keys per tile ("blocked"); 256 and 1024 within 5% on the 2-core CPU


def resolve(implementation: str) -> str:
  """"auto" -> the backend's schedule; others are checked and returned."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return "blocked" if _platform() == "cpu" else "xla"
  return implementation


def _platform() -> str:
  """The platform the traced program runs on: the set mesh's devices' (they may be another platform's compile-only
  devices), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return jax.default_backend() if device is None else device.platform


def _own_rows(fn, *xs):
  """fn(*xs) on arrays whose leading axis is the batch, each device mapping over its own rows when the set mesh's
  batch axes split them (`sharding.row_axes`); fn itself otherwise."""
  axes = sharding.row_axes(xs[0].shape[0])
  if not axes:
    return fn(*xs)
  spec = P(axes)
  return jax.shard_map(fn, in_specs=(spec,) * len(xs), out_specs=spec, axis_names=frozenset(axes),
                       check_vma=False)(*xs)


def visible(query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array,
            sliding_window: int | None) -> jax.Array:
  """Which keys each query sees: query_slots int[S], key_slots int[Sk], key_valid bool[B, Sk] -> bool[B, 1, S, Sk].

  Real keys at or before the query, within the sliding window if any. Every query also sees its own slot, so a
  padding query (whose own key is not real) never has an empty row: fused attention kernels may return NaN for empty
  rows, and 0 * NaN would leak into real rows through later layers. Real queries are unaffected (their own slot is
  real); padding rows differ from transformers' (they are garbage in both).
  """
  delta = query_slots[:, None] - key_slots[None, :]            # [S, Sk]
  allowed = delta >= 0
  if sliding_window is not None:
    allowed = allowed & (delta < sliding_window)
  return ((key_valid[:, None, :] & allowed[None]) | (delta == 0)[None])[:, None]


def masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           implementation: str = "auto") -> jax.Array:
  """One `jax.nn.dot_product_attention` call: q float[B, S, H, Dh], k/v float[B, Sk, Hkv, Dh], mask bool[B, 1, S, Sk]
  (None: every key) -> float[B, S, H, Dh]."""
  impl = "cudnn" if resolve(implementation) == "cudnn" else None
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, implementation=impl)


def bidirectional(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                  implementation: str = "auto") -> jax.Array:
  """Unmasked (or masked) attention over all keys, the vision tower's: q/k/v float[B, S, H, Dh] -> float[B, S, H, Dh].

  "blocked" without a mask and S <= 2 * BLOCK: one (row, head) at a time under `lax.map`, its S x S scores in cache
  (CLIP's 577 tokens x 4 heads x 5 crops: 21 ms per layer against 45 ms for one call on the 2-core CPU); otherwise
  one `jax.nn.dot_product_attention` call.
  """
  impl = resolve(implementation)
  b, s, h, dh = q.shape
  if impl != "blocked" or mask is not None or s > 2 * BLOCK or k.shape[2] != h:
    return masked(q, k, v, mask, "xla" if impl == "blocked" else impl)

  def one(xs):
    qi, ki, vi = xs
    logits = jnp.dot(qi * jnp.asarray(dh ** -0.5, qi.dtype), ki.T, preferred_element_type=jnp.float32)
    return jnp.dot(jax.nn.softmax(logits, axis=-1).astype(vi.dtype), vi, preferred_element_type=jnp.float32)

  def rows(q, k, v):
    n = q.shape[0]
    heads = lambda a: a.astype(q.dtype).transpose(0, 2, 1, 3).reshape(n * h, s, dh)
    out = jax.lax.map(one, (heads(q), heads(k), heads(v))).astype(q.dtype)
    return out.reshape(n, h, s, dh).transpose(0, 2, 1, 3)

  return _own_rows(rows, q, k, v)


def with_cache(q: jax.Array, k_old: jax.Array, v_old: jax.Array, old_visible: jax.Array, k_new: jax.Array,
               v_new: jax.Array, new_visible: jax.Array, implementation: str = "auto") -> jax.Array:
  """Attention of S new tokens over W cached slots and over themselves, without writing them into the cache first.

  q float[B, S, H, Dh]; k_old/v_old float[B, W, Hkv, Dh] with old_visible bool[B, 1, S, W]; k_new/v_new
  float[B, S, Hkv, Dh] with new_visible bool[B, 1, S, S] (every query sees its own slot, so this part is never
  empty) -> float[B, S, H, Dh]. Two `jax.nn.dot_product_attention` calls return their logsumexp residuals; the
  softmax over the union of the keys is their outputs weighted by exp(lse_part - lse_union), exactly. A query that
  sees no cached slot gets weight 0 from that part.
  """
  resolve(implementation)     # cuDNN takes no arbitrary mask: both parts are XLA's call on every backend
  dtype = q.dtype
  o_old, lse_old = jax.nn.dot_product_attention(q, k_old.astype(dtype), v_old.astype(dtype), mask=old_visible,
                                                return_residual=True)
  o_new, lse_new = jax.nn.dot_product_attention(q, k_new.astype(dtype), v_new.astype(dtype), mask=new_visible,
                                                return_residual=True)
  seen = jnp.any(old_visible, axis=-1).transpose(0, 2, 1)               # [B, S, 1]: broadcasts over heads
  lse_old = jnp.where(seen, lse_old.astype(jnp.float32), -jnp.inf)
  lse_new = lse_new.astype(jnp.float32)
  top = jnp.maximum(lse_old, lse_new)
  w_old, w_new = jnp.exp(lse_old - top)[..., None], jnp.exp(lse_new - top)[..., None]
  o_old = jnp.where(seen[..., None], o_old.astype(jnp.float32), 0.0)
  out = (o_old * w_old + o_new.astype(jnp.float32) * w_new) / (w_old + w_new)
  return out.astype(dtype)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, sliding_window: int | None = None,
           implementation: str = "auto", block: int | None = None) -> jax.Array:
  """Causal self-attention of a fresh sequence (the query at index s sits in slot s, keys are the same tokens).

  q float[B, S, H, Dh], k/v float[B, S, Hkv, Dh], valid bool[B, S] real tokens -> float[B, S, H, Dh]. block: query
  rows per block and keys per tile of the "blocked" schedule (default the module's `BLOCK`, read at call time).
  """
  impl = resolve(implementation)
  block = BLOCK if block is None else block
  b, s, h, dh = q.shape
  slots = jnp.arange(s)
  if impl == "cudnn":
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True,
                                        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        local_window_size=window, implementation="cudnn")
  if impl != "blocked" or s <= block:
    return masked(q, k, v, visible(slots, slots, valid, sliding_window), impl)
  return _own_rows(lambda q, k, v, valid: _blocked_causal(q, k, v, valid, sliding_window, block), q, k, v, valid)


def _blocked_causal(q, k, v, valid, sliding_window: int | None, block: int):
  """The "blocked" schedule of `causal` (same arguments)."""
  b, s, h, dh = q.shape
  hkv = k.shape[2]
  g = h // hkv
  # One element per (row, key/value head): its G query heads stacked as G x C query rows of each block.
  qg = q.reshape(b, s, hkv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b * hkv, g, s, dh)
  kg = k.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b * hkv, s, dh)
  vg = v.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b * hkv, s, dh)
  validg = jnp.repeat(valid, hkv, axis=0)
  outs = []
  for lo in range(0, s, block):
    hi = min(s, lo + block)
    lo_k = 0 if sliding_window is None else max(0, lo - sliding_window + 1)

    def one(xs, lo=lo, hi=hi, lo_k=lo_k):
      qi, ki, vi, vali = xs
      return _online_softmax(qi[:, lo:hi], ki, vi, vali, lo, hi, lo_k, sliding_window, block)

    outs.append(jax.lax.map(one, (qg, kg, vg, validg)))
  out = jnp.concatenate(outs, axis=2)                          # [B * Hkv, G, S, Dh]
  return out.reshape(b, hkv, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h, dh)


_MASKED = -1e30     # finite: a tile a row cannot see gives exp(_MASKED - max) = 0, never inf - inf


def _online_softmax(q, k, v, valid, lo: int, hi: int, lo_k: int, sliding_window: int | None, tile: int):
  """Flash attention of one query block over its keys, tile by tile (the CPU "blocked" schedule).

  q float[G, C, Dh] (queries at slots lo..hi-1), k/v float[S, Dh], valid bool[S] -> float[G, C, Dh]. Keys
  [lo_k, hi) in tiles of `tile`; a running max, denominator and weighted sum per query (float32), rescaled when a
  later tile raises the max. Masking as `visible`.
  """
  gq, c, dh = q.shape
  rows = q.reshape(gq * c, dh) * jnp.asarray(dh ** -0.5, q.dtype)
  q_slots = jnp.tile(jnp.arange(lo, hi), gq)[:, None]
  top = jnp.full((gq * c, 1), _MASKED, jnp.float32)
  den = jnp.zeros((gq * c, 1), jnp.float32)
  acc = jnp.zeros((gq * c, dh), jnp.float32)
  for t0 in range(lo_k, hi, tile):
    t1 = min(hi, t0 + tile)
    k_slots = jnp.arange(t0, t1)[None, :]
    logits = jnp.dot(rows, k[t0:t1].T, preferred_element_type=jnp.float32)
    delta = q_slots - k_slots
    seen = (delta >= 0) & valid[None, t0:t1]
    if sliding_window is not None:
      seen = seen & (delta < sliding_window)
    logits = jnp.where(seen | (delta == 0), logits, _MASKED)
    new_top = jnp.maximum(top, jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - new_top)
    scale = jnp.exp(top - new_top)
    den = den * scale + jnp.sum(p, axis=-1, keepdims=True)
    acc = acc * scale + jnp.dot(p.astype(v.dtype), v[t0:t1], preferred_element_type=jnp.float32)
    top = new_top
  return (acc / den).astype(q.dtype).reshape(gq, c, dh)
