"""Prefill FLOPs of a LLaMA-style decoder when the sequence length changes from layer to layer.

Counted as the token-pruning papers count them: per layer, 2 * S * (parameters of the layer's matmuls) for the
projections and the MLP, plus 4 * S^2 * H * Dh for attention scores and the weighted sum (no causal halving).
Norms, RoPE and softmax are left out; the vision tower costs the same for every Stage I/II method, so it is left out
too. The LM head (2 * D * V per position) is counted at `lm_head_positions` positions: the runner's timed prefill
computes it at one position per row (the last), so its FLOPs and its time measure the same decoder work.
"""

from typing import Sequence

__all__ = ["layer_prefill_flops", "decoder_prefill_flops"]


def layer_prefill_flops(text_config, seq_len: float) -> float:
  """FLOPs of one decoder layer on `seq_len` tokens (fractional means: averaged over a batch)."""
  c = text_config
  q_width = c.num_attention_heads * c.head_dim
  kv_width = c.num_key_value_heads * c.head_dim
  weights = c.hidden_size * (q_width + 2 * kv_width) + q_width * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
  return 2.0 * seq_len * weights + 4.0 * seq_len * seq_len * q_width


def decoder_prefill_flops(text_config, seq_lens: Sequence[float], lm_head_positions: int = 0) -> float:
  """Total over layers (`seq_lens[l]`: the tokens layer l processes) plus the LM head at `lm_head_positions`."""
  if len(seq_lens) != text_config.num_hidden_layers:
    raise ValueError(f"seq_lens has {len(seq_lens)} entries, the decoder has {text_config.num_hidden_layers} layers")
  head = 2.0 * lm_head_positions * text_config.hidden_size * text_config.vocab_size
  return sum(layer_prefill_flops(text_config, s) for s in seq_lens) + head
