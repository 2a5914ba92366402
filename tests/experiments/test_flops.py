"""experiments.flops against a count made from the model itself: every matmul kernel of a decoder layer and the LM
head of a tiny LLaMA port."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import flops
from models import llama


def _tiny():
  config = llama.TextConfig.from_hf(dict(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
  return config, llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def test_layer_flops_are_two_per_weight_per_token_plus_attention():
  config, model = _tiny()
  layer = model.model.layer(0)
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param))
             if "kernel" in jax.tree_util.keystr(path)]
  weights = sum(int(np.prod(k.shape)) for k in kernels)        # q, k, v, o, gate, up, down
  assert len(kernels) == 7
  s = 11
  scores_and_mix = 2 * (2 * s * s * config.num_attention_heads * config.head_dim)   # q k^T and p v, no causal halving
  assert flops.layer_prefill_flops(config, s) == 2 * s * weights + scores_and_mix


def test_decoder_flops_sum_layers_and_count_the_lm_head_where_asked():
  config, model = _tiny()
  lens = [11, 7, 3]
  layers = sum(flops.layer_prefill_flops(config, s) for s in lens)
  assert flops.decoder_prefill_flops(config, lens) == layers
  head = int(np.prod(model.lm_head.kernel.shape))                # D x V
  assert flops.decoder_prefill_flops(config, lens, lm_head_positions=1) == layers + 2 * head
  with pytest.raises(ValueError, match="3 layers"):
    flops.decoder_prefill_flops(config, lens[:2])
