"""Checks of model inputs at the public entry points: the models' calls, `generate.greedy`, `pruning.forward/greedy`.

Axes: B batch, S sequence, I images.

Shape checks always run (under jit, at trace time). Value checks (token ids inside the vocabulary, finite pixels) run
only on concrete arrays: a traced value cannot be read, and a check inside the compiled program could not raise.
Both kinds of bad value fail silently otherwise: an out-of-range id is embedded as NaN (`jnp.take` fills out-of-bounds
rows) or wraps around, and one NaN pixel turns every logit of its row into NaN and every greedy selection over it into
-1 indices, so the entry points reject them before anything is traced.
"""

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_concrete", "check_input_ids", "check_pixel_values", "check_max_new_tokens"]


def is_concrete(x) -> bool:
  """True for a host or device array whose values can be read (not a tracer, not None)."""
  return x is not None and not isinstance(x, jax.core.Tracer)


def check_input_ids(input_ids, vocab_size: int) -> None:
  """Raises ValueError unless input_ids is a non-empty int[B, S] with (when concrete) every id in [0, vocab_size).

  Padding positions are checked too: their embeddings enter the attention values, so a NaN row there poisons the
  real tokens as well.
  """
  shape = np.shape(input_ids)
  if len(shape) != 2:
    raise ValueError(f"input_ids must be int[B, S], got shape {shape}")
  if shape[0] == 0:
    raise ValueError(f"input_ids is an empty batch (shape {shape}); pass at least one row")
  if shape[1] == 0:
    raise ValueError(f"input_ids has no tokens (shape {shape}); every row needs at least one token")
  dtype = input_ids.dtype if hasattr(input_ids, "dtype") else np.asarray(input_ids).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"input_ids must hold integer token ids, got dtype {dtype}")
  if not is_concrete(input_ids):
    return
  ids = np.asarray(input_ids)
  outside = (ids < 0) | (ids >= vocab_size)
  if outside.any():
    row, col = np.argwhere(outside)[0]
    raise ValueError(f"input_ids hold {int(outside.sum())} token id(s) outside the vocabulary [0, {vocab_size}), "
                     f"the first {int(ids[row, col])} at row {row}, position {col}")


def check_pixel_values(pixel_values) -> None:
  """Raises ValueError for pixel_values float[I, ...] with no image or (when concrete) NaN/inf in some image."""
  shape = np.shape(pixel_values)
  if not shape or shape[0] == 0:
    raise ValueError(f"pixel_values holds no image (shape {shape}); pass None for text-only input")
  if not is_concrete(pixel_values):
    return
  # A device array is reduced on its device, so only I flags travel; ensure_compile_time_eval keeps that reduction
  # concrete when the array is closed over inside an outer jit (it would be staged, i.e. a tracer, otherwise).
  xp = jnp if isinstance(pixel_values, jax.Array) else np
  with jax.ensure_compile_time_eval():
    finite = xp.isfinite(xp.reshape(pixel_values, (shape[0], -1))).all(axis=-1)
  if isinstance(finite, jax.Array) and not finite.is_fully_addressable:   # multi-host: each process holds its rows
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    finite = multihost_utils.process_allgather(finite, tiled=True)
  bad = np.flatnonzero(~np.asarray(finite))
  if bad.size:
    raise ValueError(f"pixel_values contain NaN/inf in image(s) {bad.tolist()} (index along axis 0, i.e. batch "
                     "row when there is one image per row)")


def check_max_new_tokens(max_new_tokens, prompt_len: int, max_positions: int) -> int:
  """max_new_tokens as an int; ValueError unless it is a positive integer with prompt_len + it <= max_positions.

  prompt_len: the longest prompt (real tokens) whose positions the new tokens continue.
  max_positions: the decoder's `max_position_embeddings`.
  """
  if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)):
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r} "
                     f"({type(max_new_tokens).__name__})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prompt_len + max_new_tokens > max_positions:
    raise ValueError(f"max_new_tokens={int(max_new_tokens)} runs past max_position_embeddings={max_positions}: "
                     f"the prompt holds {prompt_len} tokens and {prompt_len} + {int(max_new_tokens)} = "
                     f"{prompt_len + int(max_new_tokens)} > {max_positions}")
  return int(max_new_tokens)
