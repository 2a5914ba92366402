"""models.pruning Stage II options: timing "after", SparseVLM raters, PyramidDrop, variable counts and inserted rows.

Tiny random LLaVA-1.5 / LLaVA-NeXT models (CPU, float32, batch of 2). References are built by hand from the model's
public pieces (`run_layers`, `head`, the layer weights) in the official codes' loop form: a NumPy attention map, the
rater and top-k rules written out, the pruned rows gathered per row in Python.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_factories as mf
from models import anyres
from models import generate
from models import llama
from models import pruning
from models.pruning import sequence
from models.pruning import stage2
from tops_jax import prune

IMAGE = mf.IMAGE_TOKEN_ID
N = mf.NUM_PATCHES
TOL = dict(rtol=1e-4, atol=1e-4)
# The models are llava and llava_next: ports of tiny random checkpoints, from tests/models/conftest.py.
pytestmark = pytest.mark.usefixtures("float32_matmul")

_FULL = jax.jit(lambda m, b: m(**b, all_logits=True))
_LAYERS = jax.jit(lambda m, h, p, mask, start, stop: m.language_model.run_layers(h, p, mask, start=start, stop=stop),
                  static_argnames=("start", "stop"))


def _batch(family, side, seed):
  """(ids, mask, pixel_values, image_sizes | None); NeXT images of 70 and 52 tokens (newlines included)."""
  rng = np.random.RandomState(seed)
  if family == "llava":
    ids, mask = mf.prompt_rows(rng, (6, 25), (N, N), (40, 23), side)
    return ids, mask, rng.randn(2, 3, 28, 28).astype(np.float32), None
  sizes = np.array([(50, 70), (100, 20)])
  counts = [anyres.num_image_features(s, mf.TINY_PINPOINTS, 28, 7) for s in sizes]
  ids, mask = mf.prompt_rows(rng, (7, 20), counts, (30, 12), side)
  return ids, mask, rng.randn(2, 5, 3, 28, 28).astype(np.float32), sizes


def _inputs_embeds(model, ids, mask, px, sizes):
  batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(px))
  if sizes is not None:
    batch["image_sizes"] = jnp.asarray(sizes)
  return np.asarray(_FULL(model, batch).inputs_embeds)


def _run(model, h, positions, mask, start, stop):
  if start == stop:
    return np.asarray(h)
  out = _LAYERS(model, jnp.asarray(h), jnp.asarray(positions), jnp.asarray(mask, bool), start, stop)
  return np.asarray(out.hidden)


def _np_attention(model, layer, hidden, positions, mask):
  """Decoder `layer`'s head-mean attention map over its input (NumPy, float64, causal + padding masked):
  float64[B, S, S]."""
  return mf.np_attention(model, layer, hidden, positions, mask)[0].mean(1)


_positions = mf.mask_positions
_layout = mf.padded_rows            # per-row slot lists -> int[B, size] (-1 padding), packed to the left or right


def _sparsevlm_raters(h0, visual, text):
  """SparseVLM v1's rater rule on one row's LLM input: softmax over text of v @ t^T, mean over the visual tokens,
  strictly above the mean."""
  m = h0[visual].astype(np.float64) @ h0[text].astype(np.float64).T
  m = np.exp(m - m.max(1, keepdims=True))
  m = (m / m.sum(1, keepdims=True)).mean(0)
  return [t for t, v in zip(text, m) if v > m.mean()] or list(text)


# ---------------------------------------------------------------------------------------------- timing "after"


@pytest.mark.slow
@pytest.mark.parametrize("family,raters,side,layer", [("llava", "sparsevlm", "left", 1),
                                                       ("llava_next", "attention", "right", 0)])
def test_after_timing_equals_unpruned_layers_then_pruned_sequence(request, family, raters, side, layer):
  """timing "after" at l: layers [0, l] run unpruned, layer l's attention rows score, the pruned output of layer l
  enters layer l + 1; raters from SparseVLM's input-embedding rule or from layer l's attention."""
  model = request.getfixturevalue(family)
  ids, mask, px, sizes = _batch(family, side, seed=11)
  keep = 7
  hp = {"alpha": 0.5, "lam": 0.5}
  cfg = pruning.PruningConfig.flat("tops", stage2=((layer, keep),), stage2_timing="after", stage2_raters=raters,
                                   stage2_hparams=hp)
  assert cfg.segments(3) == ((0, layer + 1), (layer + 1, 3)) and cfg.score_layer(layer) == layer
  out = pruning.forward(model, cfg, ids, mask, px, sizes, all_logits=True)

  h0 = _inputs_embeds(model, ids, mask, px, sizes)
  msk, pos = mask.astype(bool), _positions(mask)
  h_in = _run(model, h0, pos, msk, 0, layer)                    # the input of layer l, unpruned
  attn = _np_attention(model, layer, h_in, pos, msk)
  h = _run(model, h_in, pos, msk, layer, layer + 1)             # layer l runs on the full sequence
  kept_rows = []
  for r in range(2):
    real = np.flatnonzero(msk[r])
    visual = [p for p in real if ids[r, p] == IMAGE]
    text = [p for p in real if p > visual[-1]]
    if raters == "sparsevlm":
      rating = _sparsevlm_raters(h0[r], visual, text)
    else:
      mass = attn[r][np.ix_(text, visual)].sum(-1)
      rating = [t for t, v in zip(text, mass) if v > mass.mean()] or text
    rel = attn[r][np.ix_(rating, visual)].mean(0).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out.stage2[0].relevance[r])[:len(visual)], rel, rtol=1e-4, atol=1e-6)
    kept = np.asarray(prune.select("tops", h[r, visual], keep=keep, relevance=rel, **hp))   # layer l's OUTPUT
    np.testing.assert_array_equal(np.asarray(out.stage2[0].kept[r]), kept)
    kept_rows.append([p for p in real if ids[r, p] != IMAGE or p in {visual[i] for i in kept}])
  index = _layout(kept_rows, out.segments[1].source.shape[1], side == "left")
  np.testing.assert_array_equal(np.asarray(out.segments[1].source), index)
  new_mask = index >= 0
  h = np.take_along_axis(h, np.maximum(index, 0)[..., None], 1)
  h = _run(model, h, _positions(new_mask), new_mask, layer + 1, 3)
  want = np.asarray(model.head(jnp.asarray(h)))
  np.testing.assert_allclose(np.asarray(out.logits)[new_mask], want[new_mask], **TOL)
  tokens = np.asarray(out.tokens_per_layer)
  np.testing.assert_array_equal(tokens[:, :layer + 1], np.repeat(mask.sum(-1)[:, None], layer + 1, 1))
  np.testing.assert_array_equal(tokens[:, layer + 1:], np.repeat(new_mask.sum(-1)[:, None], 2 - layer, 1))

  if family == "llava":   # the KV cache of layer l holds the full sequence: decoding matches recomputation
    steps = 3
    gen = pruning.greedy(model, cfg, ids, mask, pixel_values=px, max_new_tokens=steps)
    tokens = np.asarray(gen.tokens)
    for t in range(1, steps):
      rows0 = np.concatenate([h0, np.asarray(model.language_model.embed(jnp.asarray(tokens[:, :t])))], 1)
      m0 = np.concatenate([msk, np.ones((2, t), bool)], 1)
      p0 = np.concatenate([pos, pos.max(-1, keepdims=True) + 1 + np.arange(t)], 1)
      y = _run(model, rows0, p0, m0, 0, layer + 1)
      s0 = h0.shape[1]
      rows1 = np.concatenate([np.take_along_axis(y[:, :s0], np.maximum(index, 0)[..., None], 1), y[:, s0:]], 1)
      p1 = _positions(new_mask)
      p1 = np.concatenate([p1, p1.max(-1, keepdims=True) + 1 + np.arange(t)], 1)
      y = _run(model, rows1, p1, np.concatenate([new_mask, np.ones((2, t), bool)], 1), layer + 1, 3)
      want = np.asarray(model.head(jnp.asarray(y[:, -1:])))[:, 0]
      np.testing.assert_array_equal(tokens[:, t], want.argmax(-1))


# --------------------------------------------------------------------------------------------------- PyramidDrop


def _pdrop_official(model, ids, mask, h0, layers, ratios):
  """PyramidDrop's inference loop (`pdrop_forward` + `pdrop_rank_drop`) per unpadded row: after layer
  rank_layer - 1, layer rank_layer's attention of the last instruction token, mean over heads, over the
  int(N * ratio[s]) image tokens left; keep the top int(N * ratio[s + 1]), ascending; positions arange.
  Returns (kept packed slots per step per row, last-token logits per row)."""
  ratio = [1.0] + list(ratios)
  num_layers = model.config.text.num_hidden_layers
  kept, logits = [[] for _ in layers], []
  for r in range(ids.shape[0]):
    real = np.flatnonzero(mask[r])
    h = h0[r, real][None]
    image_index = int(np.flatnonzero(ids[r, real] == IMAGE)[0])
    n = int((ids[r, real] == IMAGE).sum())
    prompt_len = len(real) - n
    slots = np.arange(n)                      # packed slot of each image token still in the sequence
    done = 0
    for stage, rank_layer in enumerate(layers):
      positions = np.arange(h.shape[1])[None]
      h = _run(model, h, positions, np.ones(h.shape[:2], bool), done, rank_layer)
      done = rank_layer
      cur, keep = int(n * ratio[stage]), int(n * ratio[stage + 1])
      attn = _np_attention(model, rank_layer, h, positions, np.ones(h.shape[:2], bool))[0]
      row = attn[prompt_len + cur - 1, image_index:image_index + cur]
      top = np.sort(np.argsort(-row, kind="stable")[:keep])
      kept[stage].append(slots[top])
      slots = slots[top]
      h = np.concatenate([h[:, :image_index], h[:, image_index + top], h[:, image_index + cur:]], 1)
    h = _run(model, h, np.arange(h.shape[1])[None], np.ones(h.shape[:2], bool), done, num_layers)
    logits.append(np.asarray(model.head(jnp.asarray(h[:, -1:])))[0, 0])
  return kept, np.stack(logits)


@pytest.mark.slow
@pytest.mark.parametrize("family,side", [("llava", "right"), ("llava_next", "left")])
def test_pdrop_matches_the_official_loop(request, family, side):
  """Every step's kept image tokens and the logits; on NeXT the two images keep their own int(n * ratio)."""
  model = request.getfixturevalue(family)
  ids, mask, px, sizes = _batch(family, side, seed=12)
  counts = (ids == IMAGE).sum(-1)
  cfg = pruning.pdrop_schedule(3, layers=(1, 2), lam=0.45, num_visual=int(counts.max()))
  assert cfg.method == "pdrop" and cfg.stage2_relevance == "last_token" and cfg.positions == "contiguous"
  assert [cfg.score_layer(layer) for layer, _ in cfg.steps] == [1, 2]
  out = pruning.forward(model, cfg, ids, mask, px, sizes)
  kept, want = _pdrop_official(model, ids, mask, _inputs_embeds(model, ids, mask, px, sizes), (1, 2), cfg.stage2_ratios)
  for step, (_, keep) in enumerate(cfg.steps):
    got = np.asarray(out.stage2[step].kept)
    assert got.shape[1] == keep
    for r in range(2):
      np.testing.assert_array_equal(got[r, :len(kept[step][r])], kept[step][r])
      assert (got[r, len(kept[step][r]):] == -1).all()
  if family == "llava_next":
    assert [len(k) for k in kept[0]] == [31, 23] and [len(k) for k in kept[1]] == [14, 10]
  np.testing.assert_allclose(np.asarray(out.logits)[:, 0], want, **TOL)


def test_pdrop_schedule_settings():
  official = pruning.pdrop_schedule(32)
  assert official.steps == ((8, 288), (16, 144), (24, 72)) and official.stage2_ratios == (0.5, 0.25, 0.125)
  assert pruning.pdrop_schedule(40).steps == ((8, 288), (16, 144), (24, 72))     # 13B: the same layers
  low = pruning.pdrop_schedule(32, 64)
  assert low.steps == ((2, 109), (8, 20), (16, 3)) and low.stage2_ratios == (0.19, 0.0361, 0.006859)
  assert pruning.pdrop_schedule(32, 128).stage2_ratios[0] == 0.42
  mid = pruning.pdrop_schedule(32, 192)
  assert [layer for layer, _ in mid.steps] == [8, 16, 24] and mid.stage2_ratios[0] == 0.25
  nxt = pruning.pdrop_schedule(32, 640, family="llava-next", num_visual=2928)
  assert nxt.steps == ((2, int(2928 * 0.42)), (8, int(2928 * 0.1764)), (16, int(2928 * 0.074088)))
  with pytest.raises(ValueError, match="above target=32"):
    pruning.pdrop_schedule(32, 32)
  with pytest.raises(ValueError, match="not both"):
    pruning.pdrop_schedule(32, 64, lam=0.5)
  with pytest.raises(ValueError, match="too shallow"):
    pruning.pdrop_schedule(4)
  with pytest.raises(ValueError, match="num_visual"):
    pruning.pdrop_schedule(4, 10, family="testbed", layers=(1, 2))


# ----------------------------------------------------------------------------- variable counts, inserted rows


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_rebuild_with_row_counts_and_inserted_rows_is_exact(llava, side):
  """A synthetic selector: row 0 keeps 3 of K = 6 and one of its two inserted rows, row 1 keeps 6 and both.
  The rebuilt sequence, the logits of the layers after it and two decoding steps through the KV cache equal a
  sequence built by hand per row."""
  model = llava
  lm = model.language_model
  ids, mask, px, _ = _batch("llava", side, seed=13)
  msk, pos = mask.astype(bool), _positions(mask)
  h0 = _inputs_embeds(model, ids, mask, px, None)
  visual = (ids == IMAGE) & msk
  seq = sequence.Seq(hidden=jnp.asarray(h0), positions=jnp.asarray(pos, jnp.int32)[None], mask=jnp.asarray(msk),
                     visual=jnp.asarray(visual), source=jnp.asarray(np.where(msk, np.arange(ids.shape[1]), -1)),
                     packed=jnp.asarray(np.where(visual, np.cumsum(visual, -1) - 1, -1)))
  steps, keep = 2, 6
  text_len = int((msk & ~visual).sum(-1).max())
  plan = sequence.Plan(text_len=text_len, visual=N, newlines=0)
  cache = llama.init_cache(model.config.text, 2, ids.shape[1] + steps, jnp.float32)
  first = lm.run_layers(seq.hidden, seq.positions, seq.mask, start=0, stop=1, cache=cache)
  seq1 = seq._replace(hidden=first.hidden)
  cand, cand_valid = sequence.first(seq1.visual, N)
  scores = stage2.Scores(cand, cand_valid, None, *sequence.text_after_image(seq1.mask, seq1.visual, text_len), None)
  rng = np.random.RandomState(0)
  order = np.stack([rng.permutation(N)[:keep] for _ in range(2)]).astype(np.int32)
  count = np.array([3, 6], np.int32)
  extra = rng.randn(2, 2, h0.shape[-1]).astype(np.float32)
  extra_valid = np.array([[True, False], [True, True]])
  choice = stage2.Choice(jnp.asarray(order), jnp.asarray(count), jnp.asarray(extra), jnp.asarray(extra_valid))
  cfg = pruning.PruningConfig.flat("tops", stage2=((1, keep),))
  seq2, index, stage = stage2.rebuild(cfg, plan, seq1, keep, scores, choice, jnp.asarray(side == "left"))

  # By hand: [prefix; kept image tokens ascending; valid inserted rows; suffix], contiguous positions.
  h1, s = np.asarray(first.hidden), ids.shape[1]
  rows, kept_slots = [], []
  for r in range(2):
    real = np.flatnonzero(msk[r])
    image = [p for p in real if visual[r, p]]
    kept = sorted(order[r, :count[r]])
    kept_slots.append(kept)
    rows.append([p for p in real if p < image[0]] + [image[i] for i in kept]
                + [s + e for e in range(2) if extra_valid[r, e]] + [p for p in real if p > image[-1]])
  size = text_len + keep + 2
  want_index = _layout(rows, size, side == "left")
  np.testing.assert_array_equal(np.asarray(index), want_index)
  for r in range(2):
    np.testing.assert_array_equal(np.asarray(stage.kept[r]), kept_slots[r] + [-1] * (keep - count[r]))
  new_mask = want_index >= 0
  np.testing.assert_array_equal(np.asarray(seq2.mask), new_mask)
  np.testing.assert_array_equal(np.asarray(seq2.positions), _positions(new_mask)[None])
  np.testing.assert_array_equal(np.asarray(seq2.visual), new_mask & (
      (want_index >= s) | np.take_along_axis(visual, np.clip(want_index, 0, s - 1), 1)))
  joined = np.concatenate([h1, extra], 1)
  h2 = np.where(new_mask[..., None], np.take_along_axis(joined, np.maximum(want_index, 0)[..., None], 1), 0)
  np.testing.assert_array_equal(np.asarray(seq2.hidden), h2)
  second = lm.run_layers(seq2.hidden, seq2.positions, seq2.mask, start=1, stop=3, cache=first.cache)
  want = np.asarray(model.head(jnp.asarray(_run(model, h2, _positions(new_mask), new_mask, 1, 3))))
  got = np.asarray(model.head(second.hidden))
  np.testing.assert_allclose(got[new_mask], want[new_mask], **TOL)

  # Decoding: token t sits at last_g + 1 + t in segment g; recomputed without a cache on [kept rows; new tokens].
  cache, tokens = second.cache, rng.randint(3, IMAGE - 1, (2, steps))
  last = np.stack([pos.max(-1), _positions(new_mask).max(-1)], -1)
  for t in range(steps):
    logits, cache = generate.decode_step(model, cache, jnp.asarray(tokens[:, t]), jnp.asarray(last + 1 + t),
                                         segments=((0, 1), (1, 3)))
    new = np.asarray(lm.embed(jnp.asarray(tokens[:, :t + 1])))
    y = _run(model, np.concatenate([h0, new], 1), np.concatenate([pos, last[:, :1] + 1 + np.arange(t + 1)], 1),
             np.concatenate([msk, np.ones((2, t + 1), bool)], 1), 0, 1)
    joined = np.concatenate([y[:, :s], extra], 1)
    rows1 = np.take_along_axis(joined, np.maximum(want_index, 0)[..., None], 1) * new_mask[..., None]
    y = _run(model, np.concatenate([rows1, y[:, s:]], 1),
             np.concatenate([_positions(new_mask), last[:, 1:] + 1 + np.arange(t + 1)], 1),
             np.concatenate([new_mask, np.ones((2, t + 1), bool)], 1), 1, 3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model.head(jnp.asarray(y[:, -1:])))[:, 0], **TOL)


def test_inserted_rows_take_the_image_runs_last_position_with_original_positions():
  b, s, d = 1, 6, 2
  seq = sequence.Seq(hidden=jnp.zeros((b, s, d)), positions=jnp.asarray([[[0, 1, 2, 3, 4, 5]]], jnp.int32),
                     mask=jnp.ones((b, s), bool), visual=jnp.asarray([[False, True, True, True, False, False]]),
                     source=jnp.arange(s)[None], packed=jnp.asarray([[-1, 0, 1, 2, -1, -1]]))
  scores = stage2.Scores(jnp.asarray([[1, 2, 3]]), jnp.ones((1, 3), bool), None, jnp.asarray([[4, 5]]),
                         jnp.ones((1, 2), bool), None)
  choice = stage2.Choice(jnp.asarray([[2, 0]]), jnp.asarray([2]), jnp.ones((1, 1, d)), None)
  cfg = pruning.PruningConfig.flat("fastv", stage2=((2, 2),), stage2_relevance="last_token", positions="original")
  out, index, _ = stage2.rebuild(cfg, sequence.Plan(text_len=3, visual=3, newlines=0), seq, 2, scores, choice,
                                 jnp.asarray(False))
  np.testing.assert_array_equal(np.asarray(index), [[0, 1, 3, 6, 4, 5]])
  np.testing.assert_array_equal(np.asarray(out.positions), [[[0, 1, 3, 3, 4, 5]]])   # [R = 1, B, S]
  np.testing.assert_array_equal(np.asarray(out.source), [[0, 1, 3, -1, 4, 5]])
  np.testing.assert_array_equal(np.asarray(out.visual), [[False, True, True, True, False, False]])


# ------------------------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("kwargs,match", [
    (dict(stage2_raters="text"), "stage2_raters must be one of"),
    (dict(stage2_timing="during"), "stage2_timing must be one of"),
    (dict(stage2_raters="sparsevlm", stage2_relevance="last_token"), "chooses text raters"),
    (dict(stage2_ratios=(0.5, 0.25)), "2 ratios for 1 stage2 steps"),
    (dict(stage2_ratios=(1.5,)), "must lie in \\(0, 1\\]"),
    (dict(stage2_ratios=("a",)), "sequence of floats"),
    (dict(method="dart", stage2_relevance="none", stage2_ratios=(0.5,)), "dart is not one"),
    (dict(stage2=((0, 4),)), "must be >= 1"),
    (dict(stage2=((-1, 4),), stage2_timing="after"), "must be >= 0"),
])
def test_bad_stage2_options_raise(kwargs, match):
  fields = dict(method="tops", stage2=((2, 4),))
  fields.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pruning.PruningConfig.flat(**fields)


@pytest.mark.slow
def test_after_timing_layer_range_and_score_layers(llava):
  cfg = pruning.PruningConfig.flat("tops", stage2=((0, 8), (1, 4)), stage2_timing="after")
  assert cfg.segments(3) == ((0, 1), (1, 2), (2, 3))
  fastv = pruning.PruningConfig.flat("fastv", stage2=((2, 4),), stage2_relevance="last_token")
  assert fastv.score_layer(2) == 1 and fastv.segments(3) == ((0, 2), (2, 3))
  late = pruning.PruningConfig.flat("fastv", stage2=((1, 4),), stage2_relevance="last_token", stage2_timing="after")
  assert late.score_layer(1) == 1 and late.segments(3) == ((0, 2), (2, 3))     # = "before" at 2
  ids, mask, px, _ = _batch("llava", "left", seed=0)
  with pytest.raises(ValueError, match="pruning layers lie in \\[0, 2\\)"):
    pruning.forward(llava, pruning.PruningConfig.flat("tops", stage2=((2, 4),), stage2_timing="after"), ids, mask, px)


# ------------------------------------------------------------------------------------------------------ SparseVLM


def _sparsevlm_official(model, ids, mask, h0, layers, step_args):
  """SparseVLM v1's `LlamaDynamicvitModel.forward` per unpadded row: raters once from the input embeddings; at each
  pruning layer p the layer runs on the whole sequence, its head-mean attention rows of the text (raters) over the
  visual tokens rate them, the OUTPUT of p is cut to [prefix; kept; merged; text] and positions restart at 0. The
  step itself (rank count, top-k, recycling) is `tops_jax.sparsevlm.prune_step` + `assemble`, checked against
  NumPy in tests/tops_jax/test_sparsevlm.py. Returns (kept packed slots per step per row, -1 for merged tokens;
  last-token logits)."""
  from tops_jax import sparsevlm  # pylint: disable=g-import-not-at-top
  num_layers = model.config.text.num_hidden_layers
  kept, logits = [[] for _ in layers], []
  for r in range(ids.shape[0]):
    real = np.flatnonzero(mask[r])
    h = h0[r, real][None]
    v_start = int(np.flatnonzero(ids[r, real] == IMAGE)[0])
    v_num = int((ids[r, real] == IMAGE).sum())
    text = np.arange(v_start + v_num, len(real))
    visual = np.arange(v_start, v_start + v_num)
    rating = set(_sparsevlm_raters(h[0], visual, text))
    raters = np.array([t in rating for t in text])
    slots = np.arange(v_num)
    done = 0
    for step, p in enumerate(layers):
      positions = np.arange(h.shape[1])[None]
      ones = np.ones(h.shape[:2], bool)
      h = _run(model, h, positions, ones, done, p)
      attn = _np_attention(model, p, h, positions, ones)[0]
      h = _run(model, h, positions, ones, p, p + 1)
      text_start = v_start + v_num
      block = attn[text_start:, v_start:text_start].astype(np.float32)
      out = sparsevlm.prune_step(jnp.asarray(block)[None], jnp.asarray(raters)[None],
                                 jnp.asarray(h[:, v_start:text_start]), max_keep=v_num, **step_args)
      seg = sparsevlm.assemble(jnp.asarray(h[:, v_start:text_start]), out)
      n_new = int(np.asarray(seg.valid).sum())
      origin = np.asarray(seg.origin)[0, :n_new]
      slots = np.where(origin < v_num, slots[np.minimum(origin, v_num - 1)], -1)
      kept[step].append(slots)
      h = np.concatenate([h[:, :v_start], np.asarray(seg.tokens)[:, :n_new], h[:, text_start:]], 1)
      v_num, done = n_new, p + 1
    h = _run(model, h, np.arange(h.shape[1])[None], np.ones(h.shape[:2], bool), done, num_layers)
    logits.append(np.asarray(model.head(jnp.asarray(h[:, -1:])))[0, 0])
  return kept, np.stack(logits)


@pytest.mark.slow
def test_sparsevlm_matches_the_official_loop(llava):
  """Short questions (rank below N) so that both steps prune and recycle; left padding, batch of 2."""
  model = llava
  rng = np.random.RandomState(14)
  ids, mask = mf.prompt_rows(rng, (6, 9), (N, N), (5, 4), "left")
  px = rng.randn(2, 3, 28, 28).astype(np.float32)
  cfg = pruning.PruningConfig.flat("sparsevlm", stage2=((0, N), (1, N)), stage2_relevance="raters",
                                   stage2_raters="sparsevlm", stage2_timing="after",
                                   stage2_hparams={"version": "v1", "budget": 64})
  out = pruning.forward(model, cfg, ids, mask, px)
  kept, want = _sparsevlm_official(model, ids, mask, _inputs_embeds(model, ids, mask, px, None), (0, 1),
                                   dict(scale=0.8, bias=0.0))
  assert any(len(k) < N for k in kept[0]), "the first step must prune for this test to mean anything"
  assert any((k == -1).any() for k in kept[1]), "the second step must see a recycled token"
  for step in range(2):
    got = np.asarray(out.stage2[step].kept)
    for r in range(2):
      n_kept = int((np.asarray(out.segments[step + 1].visual[r])).sum())
      assert n_kept == len(kept[step][r])
      np.testing.assert_array_equal(got[r, :len(kept[step][r])], np.where(kept[step][r] >= 0, kept[step][r], -1))
  np.testing.assert_allclose(np.asarray(out.logits)[:, 0], want, **TOL)
  gen = pruning.greedy(model, cfg, ids, mask, pixel_values=px, max_new_tokens=2)   # static cache capacity holds
  np.testing.assert_array_equal(np.asarray(gen.tokens)[:, 0], want.argmax(-1))
