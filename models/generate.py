"""Greedy decoding with a preallocated KV cache, matching transformers' `generate(do_sample=False)`; the one decoder
of the project (pruned generation runs it too, with its own prefill and layer segments).

Axes (`models` legend): B batch, S prompt length, M = max_new_tokens, V vocabulary, W cache capacity (S + M),
L decoder layers, G layer segments.

    out = generate.greedy(model, input_ids, attention_mask, pixel_values=px, max_new_tokens=32,
                          eos_token_ids=(2,), pad_token_id=0)
    out.tokens       # int32[B, M] new tokens; after a row's stop token, pad_token_id (as transformers)
    out.num_tokens   # int32[B] new tokens per row up to and including its stop token

How it runs: two jitted programs. `prefill` (jitted per shapes, prefill function and capacity) allocates the cache
and runs the prefill function; `decode` (jitted per shapes, segments, M and stop tokens) runs
`jax.lax.while_loop` over decode steps (`decode_step`: one token per row through the G layer segments, position =
previous + 1), stopping early when every row has emitted a stop token. Nothing recompiles per token, and a caller
that times the prefill (the runner) times exactly the call whose output is decoded.

Model protocol (LLaVA, LLaVA-NeXT, text-only LLaMA/Mistral): `model(input_ids=..., attention_mask=..., cache=...,
[pixel_values=..., image_sizes=...])` returns an object with `.logits` float32[B, 1, V] at the last position and
`.cache`; `model.language_model` is the `models.llama.LlamaModel`; `model.head(hidden)` applies the final norm and
lm_head; `model.config` has the decoder config as `.text` (LLaVA) or is it (text-only).

Where decoding starts: a `Prefill` (logits float32[B, V] of each row's last prompt token, the filled cache,
positions int32[B, G] of that token in each layer segment, and an `extra` returned untouched). `prefill` is the
model's own (one segment); `models.pruning.prefill` builds one that runs the Stage I/II schedule, whose later layer
segments hold shorter caches and re-indexed positions, and decoding continues in segment g from
`positions[:, g] + 1`. Either way `decode` only reads the `Prefill`: nothing here calls back into the caller.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import checks
from models import llama

__all__ = ["GenerateOutput", "Prefill", "greedy", "prefill", "decode", "decode_step", "score_tokens",
           "stop_tokens"]

Segments = tuple[tuple[int, int], ...]


class GenerateOutput(NamedTuple):
  tokens: jax.Array       # int32[B, M]
  num_tokens: jax.Array   # int32[B]
  prefill: Any = None     # the prefill function's `extra`


class Prefill(NamedTuple):
  """The state decoding starts from (see the module docstring)."""
  logits: jax.Array       # float32[B, V] at each row's last prompt token
  cache: llama.KVCache
  positions: jax.Array    # int32[B, G] that token's position in each layer segment
  extra: Any = None


def _text_config(model) -> llama.TextConfig:
  config = model.config
  return config.text if hasattr(config, "text") else config


@functools.partial(jax.jit, static_argnames=("capacity", "cache_dtype"))
def prefill(model, batch: dict, *, capacity: int, cache_dtype) -> Prefill:
  """The model's own forward into an empty cache of `capacity` slots (one layer segment; jitted)."""
  cache = llama.init_cache(_text_config(model), batch["input_ids"].shape[0], capacity, cache_dtype)
  out = model(**batch, cache=cache, cache_empty=True)     # the cache was just allocated: nothing is in it yet
  last_positions = llama.position_ids_from_mask(batch["attention_mask"])[:, -1:]
  deltas = getattr(out, "rope_deltas", None)
  if deltas is not None:      # M-RoPE (Qwen2.5-VL): decoding continues after the prompt's largest position id
    last_positions = last_positions + deltas[:, None]
  return Prefill(logits=out.logits[:, -1], cache=out.cache, positions=last_positions)


def decode_step(model, cache: llama.KVCache, tokens: jax.Array, positions: jax.Array,
                segments: Segments | None = None):
  """One token per row through the layer segments: tokens int[B], positions int[B, G] (the token's position in
  segment g; int[B] for one segment) -> (logits float32[B, V], cache)."""
  lm = model.language_model
  segments = segments or ((0, lm.config.num_hidden_layers),)
  positions = positions.reshape(positions.shape[0], -1)
  x = lm.embed(tokens[:, None])
  for g, (start, stop) in enumerate(segments):
    out = lm.run_layers(x, positions[:, g:g + 1], None, start=start, stop=stop, cache=cache)
    x, cache = out.hidden, out.cache
  return model.head(x)[:, 0], cache


class _Loop(NamedTuple):
  step: jax.Array         # int32[] index of the next token to produce
  tokens: jax.Array       # int32[B, M]
  done: jax.Array         # bool[B]
  num_tokens: jax.Array   # int32[B]
  last: jax.Array         # int32[B] last produced token
  position: jax.Array     # int32[B, G] position of `last` in each segment
  cache: llama.KVCache


@functools.partial(jax.jit, static_argnames=("segments", "max_new_tokens", "eos_token_ids", "pad_token_id"))
def decode(model, start: Prefill, *, segments: Segments | None = None, max_new_tokens: int,
           eos_token_ids: tuple[int, ...] = (), pad_token_id: int = 0) -> GenerateOutput:
  """Greedy tokens from a prefill state (its `extra` is not read): the first from `start.logits`, then M - 1 decode
  steps at most (jitted; `segments` default: one segment of every layer)."""
  b = start.logits.shape[0]
  eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)

  def emit(state: _Loop, logits, cache, position):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token = jnp.where(state.done, pad_token_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    num_tokens = state.num_tokens + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(token, eos)
    return _Loop(state.step + 1, tokens, done, num_tokens, token, position, cache)

  positions = start.positions.reshape(b, -1).astype(jnp.int32)
  init = _Loop(step=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_token_id, jnp.int32),
               done=jnp.zeros((b,), bool), num_tokens=jnp.zeros((b,), jnp.int32),
               last=jnp.zeros((b,), jnp.int32), position=positions, cache=start.cache)
  state = emit(init, start.logits, start.cache, positions)

  def cond(state: _Loop):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state: _Loop):
    position = state.position + 1
    logits, cache = decode_step(model, state.cache, state.last, position, segments)
    return emit(state, logits, cache, position)

  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=state.tokens, num_tokens=state.num_tokens)


@functools.partial(jax.jit, static_argnames=("segments",))
def score_tokens(model, start: Prefill, tokens: jax.Array, *, segments: Segments | None = None) -> jax.Array:
  """Teacher-forced log-probabilities of given continuations from a prefill state (its `extra` is not read):
  tokens int[B, M] -> float32[B, M], entry t = log p(tokens[:, t] | prompt, tokens[:, :t]) (jitted). The cache must
  hold M - 1 more slots. Used to score one model's answer under another (e.g. a pruned prefill)."""
  b, m = tokens.shape
  tokens = tokens.astype(jnp.int32)
  rows = jnp.arange(b)
  logp = lambda logits, tok: jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[rows, tok]
  first = logp(start.logits, tokens[:, 0])
  if m == 1:
    return first[:, None]

  def step(carry, pair):
    cache, position = carry
    prev, nxt = pair
    position = position + 1
    logits, cache = decode_step(model, cache, prev, position, segments)
    return (cache, position), logp(logits, nxt)

  positions = start.positions.reshape(b, -1).astype(jnp.int32)
  _, rest = jax.lax.scan(step, (start.cache, positions), (tokens[:, :-1].T, tokens[:, 1:].T))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def stop_tokens(eos_token_ids) -> tuple[int, ...]:
  """An id or ids -> a tuple of ints (a static argument)."""
  if isinstance(eos_token_ids, (int, np.integer)):
    return (int(eos_token_ids),)
  return tuple(int(e) for e in eos_token_ids)


def greedy(model, input_ids, attention_mask=None, *, pixel_values=None, image_sizes=None, max_new_tokens: int,
           eos_token_ids: tuple[int, ...] | list[int] | int = (), pad_token_id: int = 0,
           cache_dtype=None, **model_inputs) -> GenerateOutput:
  """Greedy decoding of a left-padded batch with the model's own prefill (`prefill` then `decode`).

  Args:
    model: a LLaVA / LLaVA-NeXT / LlamaForCausalLM port (see the module docstring for the protocol).
    input_ids: int[B, S], left-padded.
    attention_mask: bool/int[B, S] (1 = real token); None = all real. Right padding is rejected when concrete.
    pixel_values, image_sizes: passed to the model's forward when not None.
    model_inputs: other arrays the model's forward takes (Qwen2.5-VL: image_grid_thw, mm_token_type_ids), passed
      when not None.
    max_new_tokens: M, a positive int (static); the longest prompt plus M must fit max_position_embeddings.
    eos_token_ids: stop token id(s).
    pad_token_id: emitted after a row has stopped.
    cache_dtype: KV cache dtype; default the model's compute dtype.

  Returns:
    GenerateOutput(tokens int32[B, M], num_tokens int32[B], prefill None).

  Raises:
    ValueError: a bad max_new_tokens, an empty batch, a mask of another shape or with right padding, and (concrete
      arrays) token ids outside the vocabulary or NaN/inf pixel_values (`models.checks`).
  """
  text = _text_config(model)
  checks.check_input_ids(input_ids, text.vocab_size)
  if attention_mask is None:
    attention_mask = jnp.ones(np.shape(input_ids), jnp.int32)
  if np.shape(attention_mask) != np.shape(input_ids):
    raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {np.shape(input_ids)}")
  prompt_len = np.shape(input_ids)[1]
  if checks.is_concrete(attention_mask):
    mask = np.asarray(attention_mask) != 0
    if not np.all(mask[:, -1]):
      raise ValueError("the last prompt position must be a real token in every row (use left padding)")
    prompt_len = int(mask.sum(axis=-1).max())
  max_new_tokens = checks.check_max_new_tokens(max_new_tokens, prompt_len, text.max_position_embeddings)
  if pixel_values is not None:
    checks.check_pixel_values(pixel_values)
  batch = dict(input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask))
  if pixel_values is not None:
    batch["pixel_values"] = jnp.asarray(pixel_values)
  if image_sizes is not None:
    batch["image_sizes"] = jnp.asarray(image_sizes)
  batch.update({k: jnp.asarray(v) for k, v in model_inputs.items() if v is not None})
  dtype = jnp.dtype(cache_dtype or model.language_model.dtype)
  start = prefill(model, batch, capacity=np.shape(input_ids)[1] + max_new_tokens, cache_dtype=dtype)
  return decode(model, start, max_new_tokens=max_new_tokens, eos_token_ids=stop_tokens(eos_token_ids),
                pad_token_id=int(pad_token_id))
