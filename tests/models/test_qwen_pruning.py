"""Pruning on Qwen2.5-VL: every method's protocol on family "qwen2_5_vl" (`models.pruning.method_config`: TOPS'
Table 10 schedule, the baselines, the `NoProtocol` reasons), then the pruned forward on a tiny Qwen (`qwen_factories`)
against transformers: every runnable method keeps tokens among its candidates with their own M-RoPE ids, TOPS' Stage
I + Stage II logits equal transformers' decoder layers run segment by segment on the same kept rows with
`get_rope_index`'s ids, and the pruned greedy decoding through the KV cache equals that reference without a cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import qwen_factories as qf
from models import loading
from models import pruning

TOL = dict(rtol=1e-4, atol=1e-4)
FAMILY = "qwen2_5_vl"
# Table 10 of the paper (Qwen2.5-VL-7B, 28 layers), read literally: target -> (Stage I, after L12, after L16).
TABLE10 = {256: (512, 281, 77), 128: (256, 139, 39), 64: (128, 71, 19)}
# The tiny model: 4 decoder layers; images of 15, 16 and 12 merged tokens, the second prompt holds two of them.
SIZES = ((84, 140), (112, 112), (112, 84))
QUESTIONS = ("What colour is the large object on the left side of the picture?", "Describe both images.")
LAYERS = 4
TARGET = 4
TOPS_TINY = dict(layers=(1, 3), stage2_keeps=(5, 2))     # Table 10 has no 4-layer row: its shape, scaled down


def _cfg(method, target=256, num_layers=28, **overrides):
  return pruning.method_config(method, family=FAMILY, target=target, num_layers=num_layers, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Protocols (no model).

@pytest.mark.parametrize("target", sorted(TABLE10))
def test_tops_follows_table_10(target):
  c = _cfg("tops", target)
  s1, b1, b2 = TABLE10[target]
  assert c.stage1_budget == s1 == 2 * target
  assert c.steps == ((12, b1), (16, b2))
  assert c.stage1_relevance == "received" and c.positions == "original" and c.stage2_timing == "before"
  assert c.stage2_relevance == "raters" and c.stage2_raters == "attention"
  assert dict(c.stage1_hparams) == {"alpha": 0.5, "lam": 0.5}
  assert dict(c.stage2_hparams) == {"alpha": 0.5, "lam": 0.4}


def test_tops_outside_table_10_is_no_protocol_unless_overridden():
  with pytest.raises(pruning.NoProtocol, match=r"Table 10 lists targets \[64, 128, 256\], not 320"):
    _cfg("tops", 320)
  with pytest.raises(pruning.NoProtocol, match=r"28-layer .* this decoder has 36 layers"):
    _cfg("tops", 256, num_layers=36)
  c = _cfg("tops", 160, num_layers=36, layers=(14, 20), stage2_keeps=(170, 50))
  assert (c.stage1_budget, c.steps) == (320, ((14, 170), (20, 50)))
  with pytest.raises(ValueError, match="2 Stage II layers"):
    _cfg("tops", 256, layers=(12, 16), stage2_keeps=(281,))
  with pytest.raises(ValueError, match="more than the 512 it receives"):
    _cfg("tops", 256, stage2_keeps=(600, 77))


def test_tops_relevance_override():
  c = _cfg("tops", 128, relevance="none")
  assert c.stage1_relevance == "none"
  assert dict(c.stage1_hparams)["criteria"] == ("diversity", "coverage")
  assert "criteria" not in dict(c.stage2_hparams)           # Stage II keeps its text-rater relevance
  with pytest.raises(ValueError, match="CLS token"):
    _cfg("tops", 128, relevance="cls")
  with pytest.raises(ValueError, match="relevance criterion"):
    _cfg("tops", 128, relevance="none", criteria=("relevance", "diversity"))
  with pytest.raises(ValueError, match="must be one of"):
    _cfg("tops", 128, relevance="clip_text")


def test_llava_tops_is_unchanged_and_takes_the_new_overrides():
  c = pruning.method_config("tops", family="llava", target=128, num_layers=32)
  assert (c.stage1_budget, c.steps, c.stage1_relevance, c.positions) == (256, ((12, 128), (24, 32)), "cls",
                                                                          "contiguous")
  assert c == pruning.tops_schedule(32, 128)
  c = pruning.method_config("tops", family="llava", target=128, num_layers=32, relevance="none")
  assert c.stage1_relevance == "none" and dict(c.stage1_hparams)["criteria"] == ("diversity", "coverage")


# What each baseline runs on Qwen: (Stage I relevance, features, Stage II steps, positions) of the protocol at 256.
BASELINES = {
    "cdpruner": ("text", "projector", (), None),
    "divprune": ("none", "projector", (), None),
    "scope": ("received", "vision", (), None),
    "visionzip": ("received", "vision", (), None),
    "vispruner": ("received", "vision", (), None),
    "trimtokenator": ("text", "projector", (), None),
    "random": ("none", "projector", (), None),
    "fastv": (None, None, ((2, 256),), "original"),
    "dart": (None, None, ((2, 260),), "original"),       # 4 + 8 floor(256 / 8)
}


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_baseline_protocols(method):
  relevance, features, steps, positions = BASELINES[method]
  c = _cfg(method)
  if relevance is None:
    assert c.stage1 is None
  else:
    assert (c.stage1_budget, c.stage1_scope, c.stage1_relevance, c.stage1_features) == (256, "global", relevance,
                                                                                       features)
    assert not c.visionzip_cls
  assert c.steps == steps
  if positions:
    assert c.positions == positions


def test_no_protocol_reasons():
  with pytest.raises(pruning.NoProtocol, match="CLS token"):
    _cfg("prumerge_plus")
  with pytest.raises(pruning.NoProtocol, match="28-layer Qwen2"):
    _cfg("sparsevlm", 128)
  with pytest.raises(pruning.NoProtocol, match="gives a rule for the 28-layer"):
    _cfg("pdrop")
  with pytest.raises(pruning.NoProtocol, match="grids vary per image"):
    _cfg("pooling")
  assert not pruning.supports("prumerge_plus", FAMILY) and not pruning.supports("sparsevlm", FAMILY)
  c = _cfg("pdrop", 648, layers=(8, 16, 24))                # the variant: original positions on M-RoPE
  assert c.positions == "original" and [layer for layer, _ in c.steps] == [8, 16, 24]


def test_overrides_that_cannot_hold_on_qwen_raise():
  with pytest.raises(ValueError, match="clip_text"):
    _cfg("cdpruner", relevance="clip_text")
  with pytest.raises(ValueError, match="no CLS|has none"):
    _cfg("visionzip", visionzip_cls=True)
  for method in ("fastv", "dart"):
    with pytest.raises(ValueError, match="positions='original'"):
      _cfg(method, positions="contiguous")


# ----------------------------------------------------------------------------------------------------------------
# The pruned forward on a tiny Qwen.

@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """(transformers model, port, processor outputs of a left-padded batch: one image, then two, reference positions
  from transformers' get_rope_index, transformers' decoder input embeddings)."""
  hf, directory = qf.tiny_qwen(tmp_path_factory.mktemp("qwen_pruning"), text_layers=LAYERS)
  proc = qf.processor(directory)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
  texts = [qf.chat_prompt(QUESTIONS[0]), qf.chat_prompt(QUESTIONS[1], images=2)]
  batch = {k: np.asarray(v) for k, v in proc(images=images, text=texts, return_tensors="np", padding=True).items()}
  ids, grid = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["image_grid_thw"])
  with torch.no_grad():
    positions, _ = hf.model.get_rope_index(ids, mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
                                           image_grid_thw=grid,
                                           attention_mask=torch.from_numpy(batch["attention_mask"]))
    embeds = hf.model.get_input_embeddings()(ids)
    merged = torch.cat(hf.model.get_image_features(torch.from_numpy(batch["pixel_values"]), grid).pooler_output)
    embeds[ids == hf.config.image_token_id] = merged
  return hf, loading.load_pretrained(directory), batch, positions.numpy(), embeds


def _inputs(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k not in ("input_ids", "attention_mask")}


def _tiny_config(method, model, batch):
  overrides = {"tops": TOPS_TINY, "tops_none": dict(TOPS_TINY, relevance="none"),
               "pdrop": dict(layers=(1, 2, 3), num_visual=16)}.get(method, {})
  target = 648 if method == "pdrop" else TARGET         # pdrop: average tokens per layer of Qwen's nominal 1,296
  return _cfg(method.replace("tops_none", "tops"), target, LAYERS, **overrides)


# The quick loop runs TOPS (both stages; its compile serves the Stage II reference test) and one Stage I
# baseline; the others are the same paths with their own selections.
RUNNABLE = [m if m in ("tops", "divprune") else pytest.param(m, marks=pytest.mark.slow)
            for m in ("tops", "tops_none", "cdpruner", "divprune", "scope", "visionzip", "vispruner", "trimtokenator",
                      "random", "fastv", "dart", "pdrop")]


@pytest.mark.parametrize("method", RUNNABLE)
def test_pruned_forward_keeps_candidates_with_their_own_mrope_ids(qwen, method):
  """Each stage keeps a subset of what it received, and every token of every layer segment carries the M-RoPE ids
  transformers' get_rope_index gives it in the unpruned prompt (never renumbered)."""
  _, model, batch, positions, _ = qwen
  cfg = _tiny_config(method, model, batch)
  cfg.check_model(model)
  out = pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        key=jax.random.key(0), **_inputs(batch))
  assert np.isfinite(np.asarray(out.logits)).all()
  if cfg.stage1 is not None:
    assert (out.stage1.relevance is None) == (cfg.stage1_relevance == "none"), method
  counts = np.prod(batch["image_grid_thw"], 1) // 4
  if cfg.stage1 is not None:
    kept, candidates = np.asarray(out.stage1.kept), np.asarray(out.stage1.candidates)
    for image, (row, cand) in enumerate(zip(kept, candidates)):
      row = row[row >= 0]
      assert len(row) == len(set(row)) and set(row) <= set(cand[cand >= 0]), (method, image)
      assert len(row) == min(cfg.stage1_budget, counts[image]) or method == "visionzip", (method, image)
  previous = None
  for step in out.stage2:
    kept = [set(r[r >= 0]) for r in np.asarray(step.kept)]
    if previous is not None:
      assert all(k <= p for k, p in zip(kept, previous)), method
    previous = kept
  image_id = model.config.image_token_id
  for g, seg in enumerate(out.segments):
    source, mask = np.asarray(seg.source), np.asarray(seg.mask)
    got = np.asarray(seg.positions)
    assert got.shape[0] == 3
    for r in range(mask.shape[0]):
      src = source[r][mask[r]]
      assert (src >= 0).all() and (np.diff(src) > 0).all(), (method, g, r)
      np.testing.assert_array_equal(got[:, r][:, mask[r]], positions[:, r, src], err_msg=f"{method} segment {g}")
      visual = np.asarray(seg.visual)[r][mask[r]]
      np.testing.assert_array_equal(visual, batch["input_ids"][r, src] == image_id)


def _run_layers(hf, rows, start, stop):
  """transformers' decoder layers [start, stop) on per-row sequences: rows = [(hidden float[S_r, D], positions
  int[3, S_r])], left-padded into one batch as the port pads; returns the real rows' outputs per row."""
  lm = hf.model.language_model
  length = max(h.shape[0] for h, _ in rows)
  hidden = torch.zeros(len(rows), length, rows[0][0].shape[-1])
  pos = torch.ones(3, len(rows), length, dtype=torch.long)
  mask = torch.zeros(len(rows), length, dtype=torch.long)
  for r, (h, p) in enumerate(rows):
    hidden[r, length - h.shape[0]:], pos[:, r, length - h.shape[0]:], mask[r, length - h.shape[0]:] = h, p, 1
  layers, norm = lm.layers, lm.norm
  lm.layers, lm.norm = torch.nn.ModuleList(list(layers)[start:stop]), torch.nn.Identity()
  try:
    with torch.no_grad():
      out = lm(inputs_embeds=hidden, position_ids=pos, attention_mask=mask, use_cache=False).last_hidden_state
  finally:
    lm.layers, lm.norm = layers, norm
  return [out[r, length - h.shape[0]:] for r, (h, _) in enumerate(rows)]


def _reference_logits(qwen, cfg, out, new_tokens=None, drop=True):
  """Last-token logits of transformers' decoder run segment by segment on the rows each segment of `out` holds
  (their input_ids positions, `Segment.source`), a dropped row never coming back, with get_rope_index's ids; Stage I
  rows are transformers' own merged embeddings. new_tokens int[B, t]: tokens appended after the prompt in every
  segment (never pruned), at the prompt's largest id + 1, + 2, ... (transformers' rope_deltas). drop=False: every
  segment keeps the first segment's rows (a control: Stage II not applied)."""
  hf, _, batch, positions, embeds = qwen
  b = batch["input_ids"].shape[0]
  new_tokens = np.zeros((b, 0), np.int64) if new_tokens is None else np.asarray(new_tokens, np.int64)
  with torch.no_grad():
    new_embeds = hf.model.get_input_embeddings()(torch.from_numpy(new_tokens).long())
  real = batch["attention_mask"] > 0
  start_id = np.array([positions[:, r][:, real[r]].max() + 1 for r in range(b)])
  new_pos = start_id[:, None] + np.arange(new_tokens.shape[1])[None]
  state = [dict() for _ in range(b)]            # input_ids position -> hidden row entering the segment
  for r in range(b):
    for p in np.flatnonzero(real[r]):
      state[r][p] = embeds[r, p]
  tails = [new_embeds[r] for r in range(b)]
  for seg, (start, stop) in zip(out.segments, cfg.segments(LAYERS)):
    if drop or start == 0:
      source, mask = np.asarray(seg.source), np.asarray(seg.mask)
    rows, kept = [], []
    for r in range(b):
      src = source[r][mask[r]]
      kept.append(src)
      h = torch.cat([torch.stack([state[r][p] for p in src]), tails[r]])
      p = torch.cat([torch.from_numpy(positions[:, r, src]).long(),
                     torch.from_numpy(np.tile(new_pos[r], (3, 1))).long()], 1)
      rows.append((h, p))
    outs = _run_layers(hf, rows, start, stop)
    for r in range(b):
      n = len(kept[r])
      state[r] = dict(zip(kept[r], outs[r][:n]))
      tails[r] = outs[r][n:]
  with torch.no_grad():
    last = torch.stack([tails[r][-1] if len(tails[r]) else state[r][max(state[r])] for r in range(b)])
    return hf.lm_head(hf.model.language_model.norm(last)).numpy()


def test_tops_stage2_logits_equal_transformers_layers_on_the_kept_rows(qwen):
  """TOPS' Qwen protocol (Stage I 2T by received attention, two Stage II steps, original positions): the pruned
  prefill's last-token logits equal transformers' decoder layers run on the same kept rows between the same layers."""
  _, model, batch, _, _ = qwen
  cfg = _tiny_config("tops", model, batch)
  out = pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        key=jax.random.key(0), **_inputs(batch))
  real = [np.asarray(s.mask).sum(1) for s in out.segments]
  images = np.array([1, 2])
  np.testing.assert_array_equal(real[0] - real[1], (2 * TARGET - 5) * images)                 # 2T -> 5 per image
  np.testing.assert_array_equal(real[1] - real[2], 3 * images)                  # 5 -> 2 per image
  got = np.asarray(out.logits)[:, 0]
  np.testing.assert_allclose(got, _reference_logits(qwen, cfg, out), **TOL)
  assert np.abs(got - _reference_logits(qwen, cfg, out, drop=False)).max() > 1e-2   # the drops are seen


@pytest.mark.slow
def test_tops_cached_decoding_equals_uncached(qwen):
  """Greedy tokens of the pruned prefill + KV cache equal an argmax loop of the uncached reference (every segment's
  kept rows plus the tokens generated so far, at the prompt's largest id + 1, ...)."""
  _, model, batch, _, _ = qwen
  cfg = _tiny_config("tops", model, batch)
  steps = 3
  got = pruning.greedy(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                       max_new_tokens=steps, key=jax.random.key(0), **_inputs(batch))
  out = pruning.forward(model, cfg, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        key=jax.random.key(0), **_inputs(batch))
  np.testing.assert_allclose(np.asarray(got.prefill.logits)[:, 0], np.asarray(out.logits)[:, 0], **TOL)
  tokens = np.zeros((batch["input_ids"].shape[0], 0), np.int64)
  for _ in range(steps):
    tokens = np.concatenate([tokens, _reference_logits(qwen, cfg, out, tokens).argmax(-1)[:, None]], 1)
  np.testing.assert_array_equal(np.asarray(got.tokens), tokens)
