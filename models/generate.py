"""Greedy decoding with a preallocated KV cache, matching transformers' `generate(do_sample=False)`.

Axes: B batch, S prompt length, M = max_new_tokens, V vocabulary, C cache capacity (S + M).

    out = generate.greedy(model, input_ids, attention_mask, pixel_values=px, max_new_tokens=32,
                          eos_token_ids=(2,), pad_token_id=0)
    out.tokens       # int32[B, M] new tokens; after a row's stop token, pad_token_id (as transformers)
    out.num_tokens   # int32[B] new tokens per row up to and including its stop token

How it runs: one `jax.jit` per (shapes, M, stop tokens): prefill (the model's own forward with a cache, prompts
left-padded, positions cumsum(mask) - 1) then `jax.lax.while_loop` over decode steps (`decode_step`: one token per
row, position = previous + 1), stopping early when every row has emitted a stop token. Nothing recompiles per token.

Model protocol (LLaVA, LLaVA-NeXT, text-only LLaMA/Mistral): `model(input_ids=..., attention_mask=..., cache=...,
[pixel_values=..., image_sizes=...])` returns an object with `.logits` float32[B, S, V] and `.cache`;
`model.language_model` is the `models.llama.LlamaModel`; `model.head(hidden)` applies the final norm and lm_head;
`model.config` has the decoder config as `.text` (LLaVA) or is it (text-only).

Pruning seam: `prefill_fn(model, batch, cache) -> (last_logits float32[B, V], cache, last_positions int32[B])` replaces
the plain prefill (e.g. a Stage I/II pruned forward that leaves shorter caches in later layers and re-indexed
positions); decoding continues from `last_positions + 1`. It must be a hashable callable (it is a static argument).
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import checks
from models import llama

__all__ = ["GenerateOutput", "greedy", "default_prefill", "decode_step"]


class GenerateOutput(NamedTuple):
  tokens: jax.Array       # int32[B, M]
  num_tokens: jax.Array   # int32[B]


def _text_config(model) -> llama.TextConfig:
  config = model.config
  return config.text if hasattr(config, "text") else config


def default_prefill(model, batch: dict, cache: llama.KVCache):
  """The model's forward with a cache: -> (logits of the last position float32[B, V], cache, positions int32[B])."""
  out = model(**batch, cache=cache)
  mask = batch["attention_mask"]
  last_positions = llama.position_ids_from_mask(mask)[:, -1]
  return out.logits[:, -1], out.cache, last_positions


def decode_step(model, cache: llama.KVCache, tokens: jax.Array, positions: jax.Array):
  """One token per row: tokens int[B], positions int[B] -> (logits float32[B, V], cache)."""
  lm = model.language_model
  x = lm.embed(tokens[:, None])
  out = lm.run_layers(x, positions[:, None], None, cache=cache)
  return model.head(out.hidden)[:, 0], out.cache


class _Loop(NamedTuple):
  step: jax.Array         # int32[] index of the next token to produce
  tokens: jax.Array       # int32[B, M]
  done: jax.Array         # bool[B]
  num_tokens: jax.Array   # int32[B]
  last: jax.Array         # int32[B] last produced token
  position: jax.Array     # int32[B] position of `last`
  cache: llama.KVCache


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "eos_token_ids", "pad_token_id", "prefill_fn",
                                             "cache_dtype"))
def _greedy(model, batch, *, max_new_tokens, eos_token_ids, pad_token_id, prefill_fn, cache_dtype):
  b, s = batch["input_ids"].shape
  cache = llama.init_cache(_text_config(model), b, s + max_new_tokens, cache_dtype)
  logits, cache, last_positions = prefill_fn(model, batch, cache)
  eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)

  def emit(state: _Loop, logits, cache, position):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token = jnp.where(state.done, pad_token_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    num_tokens = state.num_tokens + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(token, eos)
    return _Loop(state.step + 1, tokens, done, num_tokens, token, position, cache)

  init = _Loop(step=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_token_id, jnp.int32),
               done=jnp.zeros((b,), bool), num_tokens=jnp.zeros((b,), jnp.int32),
               last=jnp.zeros((b,), jnp.int32), position=last_positions.astype(jnp.int32), cache=cache)
  state = emit(init, logits, cache, init.position)

  def cond(state: _Loop):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  def body(state: _Loop):
    position = state.position + 1
    logits, cache = decode_step(model, state.cache, state.last, position)
    return emit(state, logits, cache, position)

  state = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(tokens=state.tokens, num_tokens=state.num_tokens)


def greedy(model, input_ids, attention_mask=None, *, pixel_values=None, image_sizes=None, max_new_tokens: int,
           eos_token_ids: tuple[int, ...] | list[int] | int = (), pad_token_id: int = 0,
           prefill_fn: Callable = default_prefill, cache_dtype=None) -> GenerateOutput:
  """Greedy decoding of a left-padded batch.

  Args:
    model: a LLaVA / LLaVA-NeXT / LlamaForCausalLM port (see the module docstring for the protocol).
    input_ids: int[B, S], left-padded.
    attention_mask: bool/int[B, S] (1 = real token); None = all real. Right padding is rejected when concrete.
    pixel_values, image_sizes: passed to the model's forward when not None.
    max_new_tokens: M, a positive int (static); the longest prompt plus M must fit max_position_embeddings.
    eos_token_ids: stop token id(s).
    pad_token_id: emitted after a row has stopped.
    prefill_fn: see the module docstring (static; hashable).
    cache_dtype: KV cache dtype; default the model's compute dtype.

  Returns:
    GenerateOutput(tokens int32[B, M], num_tokens int32[B]).

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
  eos = (int(eos_token_ids),) if isinstance(eos_token_ids, (int, np.integer)) else tuple(int(e) for e in eos_token_ids)
  batch = dict(input_ids=jnp.asarray(input_ids), attention_mask=jnp.asarray(attention_mask))
  if pixel_values is not None:
    batch["pixel_values"] = jnp.asarray(pixel_values)
  if image_sizes is not None:
    batch["image_sizes"] = jnp.asarray(image_sizes)
  dtype = cache_dtype or model.language_model.dtype
  return _greedy(model, batch, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                 pad_token_id=int(pad_token_id), prefill_fn=prefill_fn, cache_dtype=jnp.dtype(dtype))
