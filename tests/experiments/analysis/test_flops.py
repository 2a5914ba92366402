"""experiments.analysis.flops against the ports themselves (parameter counts, cache arrays), against XLA (the dot and
convolution FLOPs of the compiled programs, and `cost_analysis`), against long-hand counts written from the
architectures, and against the TOPS paper's 41.7 TFLOPs.

XLA is compared two ways. `hlo_dot_flops` of the compiled program must equal the model exactly (both count 2 per
multiply-add of every matmul, attention included; a while body times its trip count). `cost_analysis()["flops"]`
also counts elementwise work (norms, RoPE, softmax, SiLU, residuals) and counts a while body once, so it is compared
on programs whose decoder runs one layer per `run_layers` call (a one-trip scan, which XLA inlines): it must lie
between the model and the model plus 5% (the elementwise share at these widths is 1.5-4%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.analysis import flops
from models import clip
from models import generate
from models import llama
from models import llava
from models import llava_next
from models import pruning

ELEMENTWISE = 0.05           # cost_analysis may exceed the matmul count by this fraction (module docstring)
PINPOINTS = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))   # LLaVA-1.6's at 28 px crops: up to 5 crops


def _abstract(cls, config):
  """The port with shapes only (FLOPs and parameter counts need no weights, and it builds in milliseconds)."""
  return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))


def _tiny():
  config = llama.TextConfig.from_hf(dict(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
  return config, _abstract(llama.LlamaForCausalLM, config)


def _params(module) -> tuple[int, int]:
  """(parameters, bytes) of a port."""
  leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
  return sum(p.size for p in leaves), sum(p.size * p.dtype.itemsize for p in leaves)


def test_layer_flops_are_two_per_weight_per_token_plus_attention():
  config, model = _tiny()
  stacked = nnx.state(model.model.layers, nnx.Param)          # leading L axis
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(stacked)
             if "kernel" in jax.tree_util.keystr(path)]
  weights = sum(int(np.prod(k.shape[1:])) for k in kernels)    # q, k, v, o, gate, up, down of one layer
  assert len(kernels) == 7
  s = 11
  scores_and_mix = 2 * (2 * s * s * config.num_attention_heads * config.head_dim)   # q k^T and p v, no causal halving
  assert flops.layer_prefill_flops(config, s) == 2 * s * weights + scores_and_mix
  assert flops.layer_flops(config, 1, s) == 2 * weights + 2 * (2 * s * config.num_attention_heads * config.head_dim)


def test_decoder_flops_sum_layers_and_count_the_lm_head_where_asked():
  config, model = _tiny()
  lens = [11, 7, 3]
  layers = sum(flops.layer_prefill_flops(config, s) for s in lens)
  assert flops.decoder_prefill_flops(config, lens) == layers
  head = int(np.prod(model.lm_head.kernel.shape))                # D x V
  assert flops.decoder_prefill_flops(config, lens, lm_head_positions=1) == layers + 2 * head
  with pytest.raises(ValueError, match="3 layers"):
    flops.decoder_prefill_flops(config, lens[:2])


# --------------------------------------------------------------------------------------------------- decode, memory


def _layer_weights(c) -> int:
  """Matmul weights of one layer, long-hand: q, k, v, o, gate, up, down."""
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  return c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def test_generate_flops_is_every_decode_step_over_its_growing_caches():
  config, _ = _tiny()
  cache, new = [13, 9, 4], 5
  want = 0
  for step in range(1, new):                    # token 0 comes from the prefill's logits
    for length in cache:
      keys = length + step                      # the cached prompt, tokens 1 .. step - 1 and the token itself
      want += 2 * _layer_weights(config) + 4 * keys * config.num_attention_heads * config.head_dim
    want += 2 * config.hidden_size * config.vocab_size
  assert flops.decoder_generate_flops(config, cache, new) == want
  assert flops.decoder_generate_flops(config, cache, 1) == 0
  no_head = flops.decoder_generate_flops(config, cache, new, lm_head=False)
  assert no_head == want - (new - 1) * 2 * config.hidden_size * config.vocab_size


@pytest.mark.parametrize("seq_len, block", [(100, 32), (64, 16), (7, 1), (50, None), (30, 64)])
def test_causal_keys_count_the_key_blocks_a_blocked_causal_attention_computes(seq_len, block):
  rows = block or seq_len
  keys = 0
  for query in range(seq_len):
    last_of_block = min(seq_len, (query // rows + 1) * rows)      # the block sees keys [0, its last row]
    keys += last_of_block
  assert flops.causal_keys(seq_len, block) == keys / seq_len


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_kv_cache_bytes_match_the_ports_cache(dtype):
  config, _ = _tiny()
  batch, capacity = 2, 17
  cache = llama.init_cache(config, batch, capacity, dtype)
  assert flops.kv_cache_bytes(config, [capacity] * 3, dtype, batch=batch) == cache.k.nbytes + cache.v.nbytes
  lens = [17, 10, 3]
  per_layer = [2 * n * config.num_key_value_heads * config.head_dim * np.dtype(dtype).itemsize for n in lens]
  assert flops.kv_cache_bytes(config, lens, dtype) == sum(per_layer)


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=True, mlp_bias=True), dict(tie_word_embeddings=True)])
def test_decoder_params_count_every_parameter_of_the_port(overrides):
  config = llama.TextConfig.from_hf(dict(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, **overrides))
  count, nbytes = _params(_abstract(llama.LlamaForCausalLM, config))
  assert flops.decoder_params(config) == count
  assert flops.decoder_weight_bytes(config, np.float32) == nbytes


# ------------------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("timing", ["before", "after"])
def test_schedule_seq_lens_follow_the_drivers_segments(timing):
  num_layers, text, target = 32, 57, 320
  config = pruning.tops_schedule(num_layers, target, family="llava-next", timing=timing)
  want = []
  for g, (start, stop) in enumerate(config.segments(num_layers)):
    visual = config.stage1_budget if g == 0 else config.steps[g - 1][1]
    want += [text + visual] * (stop - start)
  got = flops.schedule_seq_lens(num_layers, text, config.stage1_budget, config.steps, config.stage2_timing)
  assert got == want
  with pytest.raises(ValueError, match="outside"):
    flops.schedule_seq_lens(4, text, 8, ((4, 2),))


# -------------------------------------------------------------------------------------------------------------- XLA


def test_hlo_dot_flops_counts_dots_convolutions_and_scan_trips():
  b, i, j, k, steps = 3, 24, 40, 32, 6

  def program(x, y, w, image, kernel):
    batched = jnp.einsum("bij,bjk->bik", x, y)
    looped, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x[0], None, length=steps)
    conv = jax.lax.conv_general_dilated(image, kernel, (2, 2), "VALID")       # NCHW, OIHW
    return batched, looped, conv

  args = (jnp.ones((b, i, j)), jnp.ones((b, j, k)), jnp.ones((j, j)), jnp.ones((2, 3, 20, 20)),
          jnp.ones((8, 3, 4, 4)))
  text = jax.jit(program).lower(*args).compile().as_text()
  out_hw = (20 - 4) // 2 + 1
  want = 2 * b * i * j * k + steps * 2 * i * j * j + 2 * (2 * 8 * out_hw * out_hw) * (3 * 4 * 4)
  assert flops.hlo_dot_flops(text) == want

  def data_dependent(x, w):
    return jax.lax.while_loop(lambda h: h.sum() < 1e3, lambda h: h @ w + 1.0, x)

  text = jax.jit(data_dependent).lower(jnp.ones((i, j)), jnp.ones((j, j))).compile().as_text()
  with pytest.raises(ValueError, match="trip count"):
    flops.hlo_dot_flops(text)


_SHAPES = {   # name: (TextConfig overrides, per-layer sequence lengths of a 4-layer decoder)
    "gqa": (dict(), (64, 48, 40, 16)),
    "mqa_narrow_heads": (dict(hidden_size=64, intermediate_size=200, num_attention_heads=8, num_key_value_heads=1),
                         (50, 30, 30, 7)),
}


def _lm(overrides):
  base = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2)
  config = llama.TextConfig.from_hf({**base, **overrides})
  return config, _abstract(llama.LlamaForCausalLM, config)


def _pruned_prefill(segments, lens):
  """The decoder on segments [start, stop) at lens[start] tokens (the sequence cut between segments, as Stage II
  does), then the LM head at the last position."""
  def run(model, x):
    for start, stop in segments:
      s = lens[start]
      x = x[:, :s]
      positions = jnp.broadcast_to(jnp.arange(s), (1, s))
      x = model.model.run_layers(x, positions, None, start=start, stop=stop).hidden
    return model.head(x[:, -1:])
  return run


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile()


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(_SHAPES))
def test_prefill_flops_match_xla(shape):
  overrides, lens = _SHAPES[shape]
  config, model = _lm(overrides)
  x = jax.ShapeDtypeStruct((1, lens[0], config.hidden_size), jnp.float32)
  per_layer = _compile(_pruned_prefill([(l, l + 1) for l in range(4)], lens), model, x)
  want = flops.decoder_prefill_flops(config, lens, lm_head_positions=1)
  assert flops.hlo_dot_flops(per_layer.as_text()) == want
  assert want <= per_layer.cost_analysis()["flops"] <= want * (1 + ELEMENTWISE)

  segments = [(0, 1), (1, 3), (3, 4)]                     # scans of 1, 2 and 1 layers, three lengths
  scanned = _compile(_pruned_prefill(segments, lens), model, x)
  seg_lens = [lens[0], lens[1], lens[1], lens[3]]
  assert flops.hlo_dot_flops(scanned.as_text()) == flops.decoder_prefill_flops(config, seg_lens, lm_head_positions=1)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=4)], ids=["gqa", "mha"])
def test_decode_step_flops_match_xla_over_the_caches_capacity(overrides):
  """The port's decode attends over every one of the cache's W slots (masked) and over the new token itself
  (`models.attention.with_cache`), so its FLOPs are the model's with W + 1 keys in every layer, whatever the layer's
  real cache length."""
  config, model = _lm(overrides)
  capacity = 80
  cache = jax.eval_shape(lambda: llama.init_cache(config, 1, capacity))
  token = jax.ShapeDtypeStruct((1,), jnp.int32)
  want = flops.decoder_decode_flops(config, [capacity + 1] * 4)
  # XLA:CPU rewrites one or both one-key dots of the new-token part (q . k_new, p . v_new) as multiplies, which
  # hlo_dot_flops does not count: the dots counted lie between the model with W and with W + 1 keys.
  low = flops.decoder_decode_flops(config, [capacity] * 4)
  for segments in (((0, 1), (1, 2), (2, 3), (3, 4)), ((0, 3), (3, 4))):
    step = lambda m, c, t, p, segments=segments: generate.decode_step(m, c, t, p, segments)
    compiled = _compile(step, model, cache, token, jax.ShapeDtypeStruct((1, len(segments)), jnp.int32))
    assert low <= flops.hlo_dot_flops(compiled.as_text()) <= want
    if len(segments) == 4:
      assert want <= compiled.cost_analysis()["flops"] <= want * (1 + ELEMENTWISE)


def _vision(layers=3):
  return clip.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                               image_size=28, patch_size=7)


def _text():
  return llama.TextConfig.from_hf(dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.slow
def test_llava_next_prefill_flops_match_xla_and_params_match_the_port():
  """Whole pipeline: 5 crop slots through the tower (feature layer -2: 2 of 3 layers) with the CLS attention, the
  projector on every patch, the decoder over the packed sequence, the LM head at the last token."""
  config = llava_next.LlavaNextConfig(vision=_vision(), text=_text(), image_token_id=95, image_grid_pinpoints=PINPOINTS)
  model = _abstract(llava_next.LlavaNextForConditionalGeneration, config)
  layout = model.pack_layout(np.array([[50, 70]]))
  count = int(layout.counts[0])
  ids = jnp.asarray([[1] * 7 + [95] * count + [3] * 9])
  pixels = jax.ShapeDtypeStruct((1, config.max_num_crops, 3, 28, 28), jnp.float32)
  forward = lambda m, ids, px, lay: (lambda out: (out.logits, out.cls_attention))(
      m(input_ids=ids, pixel_values=px, layout=lay))                       # Stage I reads the CLS attention
  compiled = _compile(forward, model, ids, pixels, layout)
  want = flops.llava_prefill_flops(config, [ids.shape[1]] * 4)
  assert flops.hlo_dot_flops(compiled.as_text()) == want.total
  assert (flops.llava_params(config), flops.llava_weight_bytes(config, np.float32)) == _params(model)


@pytest.mark.slow
def test_llava_vision_flops_with_two_feature_layers_and_the_cls_token_match_xla():
  """LLaVA-1.5 with features (-3, -1) concatenated ("full": CLS kept): all 3 layers run, the projector reads 2 Dv."""
  config = llava.LlavaConfig(vision=_vision(), text=_text(), image_token_id=95, vision_feature_layer=(-3, -1),
                             vision_feature_select_strategy="full")
  model = _abstract(llava.LlavaForConditionalGeneration, config)
  assert flops.vision_layers_run(config) == 3
  pixels = jax.ShapeDtypeStruct((2, 3, 28, 28), jnp.float32)
  for cls_attention in (True, False):
    def tower(m, px, c=cls_attention):
      vis = m.encode_images(px, cls_attention=c)
      return m.project(vis.features), vis.cls_attention

    compiled = _compile(tower, model, pixels)
    want = 2 * (flops.vision_flops(config, cls_attention) + flops.projector_flops(config, 17))
    assert flops.hlo_dot_flops(compiled.as_text()) == want
  assert flops.llava_params(config) == _params(model)[0]


# ------------------------------------------------------------------------------------------------------ the paper


def _long_hand_llava_flops(config, seq_len, crops):
  """Every matmul of a LLaVA prefill counted one by one (2 per multiply-add), from the architecture."""
  v, t = config.vision, config.text
  p, dv = v.num_patches + 1, v.hidden_size
  crop = 2 * v.num_patches * (3 * v.patch_size * v.patch_size) * dv                          # patch conv
  for _ in range(v.num_hidden_layers - 1):                                                   # feature layer -2
    for din, dout in ((dv, dv), (dv, dv), (dv, dv), (dv, dv), (dv, v.intermediate_size), (v.intermediate_size, dv)):
      crop += 2 * p * din * dout
    crop += 2 * (2 * p * p * dv)                                                             # scores, mix
  crop += 2 * dv * dv + 2 * p * dv                                                           # CLS query and logits
  crop += 2 * v.num_patches * (dv * t.hidden_size + t.hidden_size * t.hidden_size)           # projector
  d, m = t.hidden_size, t.intermediate_size
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  layer = sum(2 * seq_len * a * b for a, b in ((d, q), (d, kv), (d, kv), (q, d), (d, m), (d, m), (m, d)))
  layer += 2 * (2 * seq_len * seq_len * q)
  return crops * crop + t.num_hidden_layers * layer + 2 * d * t.vocab_size


def test_paper_41_7_tflops_and_what_a_full_count_adds():
  """TOPS (METHODS.md "Efficiency"): LLaVA-NeXT-7B with 2,880 visual tokens costs 41.7 TFLOPs. That is the decoder
  count on the visual tokens alone: 32 x (2 * 2880 * (4 D^2 + 3 D M) + 4 * 2880^2 * D) = 41.65e12 with D = 4096,
  M = 11008 (no text, no LM head, no vision tower, no causal halving).

  Our full count of a typical POPE prompt (2,880 visual + ~60 text tokens; 5 crops) is 44.57 TFLOPs, +7.0%:
  the 60 text tokens +0.96 TFLOPs (+2.3%: every layer runs 2,940 tokens); the CLIP tower +1.84 TFLOPs (5 crops x
  23 layers on 577 positions, plus the CLS attention; +4.4%); the projector +0.12 TFLOPs (+0.3%); the LM head at the
  last token +0.26 GFLOPs. The runner's `prefill_flops` column is the decoder plus LM head part (42.61 TFLOPs here);
  the real LLaVA-NeXT sequence also differs from 2,880 (unpadding drops rows, newline tokens add one per row).
  """
  config = llava_next.LlavaNextConfig()                  # CLIP ViT-L/14-336 + the 7B LLaMA/Vicuna decoder
  text = config.text
  assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
          text.vocab_size, config.max_num_crops) == (4096, 11008, 32, 32, 32000, 5)
  d, m, s = 4096, 11008, 2880
  paper = 32 * (2 * s * (4 * d * d + 3 * d * m) + 4 * s * s * d)
  assert flops.decoder_prefill_flops(text, [s] * 32) == paper
  assert float(f"{paper / 1e12:.3g}") == 41.7

  full = flops.llava_prefill_flops(config, [s + 60] * 32)
  assert full.total == _long_hand_llava_flops(config, s + 60, crops=5)
  assert full.decoder + full.lm_head == flops.decoder_prefill_flops(text, [s + 60] * 32, lm_head_positions=1)
  assert 1.06 < full.total / paper < 1.08               # the +7.0% of the docstring


def test_tops_over_one_shot_costs_about_a_fifth_more_decoder_flops():
  """TOPS on LLaVA-NeXT-7B (METHODS.md: 2880 -> 2T before the LLM, -> T at L12, -> T/4 at L24; "before": layer 12
  is the first on T) against a one-shot pre-LLM method keeping T in every layer. Visual tokens averaged over the 32
  layers: (12 * 2T + 12 * T + 8 * T/4) / 32 = 38T/32 = 1.1875 T, i.e. +18.75% whatever T. Decoder prefill FLOPs
  with a 60-token prompt: +16.6% at T = 320 (5.83 vs 5.00 TFLOPs), +18.8% at T = 640 (11.08 vs 9.32); without text
  tokens +19.6% / +20.5% (the early layers' 2T also quadruples their attention term). KV cache after the prefill:
  +15.8% / +17.1%.
  """
  text_config = llama.TextConfig.from_hf({})
  text = 60
  for target, want_low, want_high, kv_low, kv_high in ((320, 1.16, 1.17, 1.15, 1.16), (640, 1.18, 1.19, 1.17, 1.18)):
    config = pruning.tops_schedule(32, target, family="llava-next")
    tops = flops.schedule_seq_lens(32, text, config.stage1_budget, config.steps, config.stage2_timing)
    visual = [2 * target if l < 12 else target if l < 24 else target // 4 for l in range(32)]   # the paper's table
    assert tops == [text + v for v in visual]
    assert np.mean(visual) / target == 38 / 32
    one_shot = [text + target] * 32
    ratio = flops.decoder_prefill_flops(text_config, tops) / flops.decoder_prefill_flops(text_config, one_shot)
    per_layer = lambda s: 2 * s * _layer_weights(text_config) + 4 * s * s * text_config.hidden_size
    assert ratio == pytest.approx(sum(map(per_layer, tops)) / sum(map(per_layer, one_shot)), rel=1e-12)
    assert want_low < ratio < want_high                  # the docstring's figures
    kv = flops.kv_cache_bytes(text_config, tops) / flops.kv_cache_bytes(text_config, one_shot)
    assert kv == (32 * text + 38 * target) / (32 * (text + target))
    assert kv_low < kv < kv_high
