"""`pruning.method_config`: each method's official protocol per backbone and budget, and the named overrides."""

import dataclasses

import pytest

from models import pruning
from models.pruning.methods import pdrop as pdrop_method
from tops_jax import dart


def _cfg(method, family="llava-next", target=320, **o):
  return pruning.method_config(method, family=family, target=target, num_layers=32, **o)


def test_cdpruner_official_next_layout():
  c = _cfg("cdpruner")
  assert (c.stage1_budget, c.stage1_scope, c.stage1_grid, c.newlines) == (320, "crop_fixed", "padded", "drop")
  assert c.stage1_relevance == "clip_text"
  one = _cfg("cdpruner", family="llava-1.5", target=64)
  assert (one.stage1_scope, one.stage1_grid, one.stage1_relevance) == ("global", "unpadded", "clip_text")


def test_cdpruner_fallback_and_our_variant_are_overrides():
  c = _cfg("cdpruner", relevance="text", scope="per_crop")
  assert (c.stage1_relevance, c.stage1_scope, c.stage1_grid, c.newlines) == ("text", "per_crop", "unpadded", "drop")


def test_divprune_ratio_over_the_packed_sequence_with_newlines():
  c = _cfg("divprune")
  assert (c.stage1_scope, c.newlines, c.stage1_relevance) == ("ratio", "candidates", "none")
  ours = _cfg("divprune", scope="global")
  assert (ours.stage1_scope, ours.newlines) == ("global", "drop")


def test_scope_reads_vision_features_per_padded_crop():
  c = _cfg("scope")
  assert (c.stage1_scope, c.stage1_grid, c.stage1_features, c.newlines) == ("crop_divided", "padded", "vision", "drop")
  assert _cfg("scope", family="llava-1.5", target=64).stage1_scope == "global"


def test_visionzip_official_split_counts_the_cls():
  c = _cfg("visionzip", target=320)
  hp = dict(c.stage1_hparams)
  assert c.visionzip_cls and (c.stage1_scope, c.stage1_grid) == ("crop_fixed", "padded")
  assert (hp["dominant"], hp["contextual"]) == (54, 10)            # 64 per crop: CLS + 53 patches + 10
  one = dict(_cfg("visionzip", family="llava-1.5", target=128).stage1_hparams)
  assert (one["dominant"], one["contextual"]) == (108, 20)         # 128 = CLS + 107 patches + 20
  ours = _cfg("visionzip", visionzip_cls=False)
  assert not ours.visionzip_cls and ours.stage1_scope == "global"


@pytest.mark.parametrize("target,kept", [(64, 68), (128, 132), (192, 196), (320, 324)])
def test_dart_official_count(target, kept):
  assert dart.kept_count(target) == kept
  assert _cfg("dart", family="llava-1.5", target=target).steps == ((2, kept),)
  assert _cfg("dart", family="llava-1.5", target=target, dart_count="exact").steps == ((2, target),)


def test_tops_is_the_paper_schedule():
  c = _cfg("tops", target=320)
  assert c.stage1_budget == 640 and c.steps == ((12, 320), (24, 80))
  assert dict(c.stage2_hparams) == {"alpha": 0.5, "lam": 0.4}
  assert dict(_cfg("tops", target=320, stage2_lam=0.7).stage2_hparams)["lam"] == 0.7


def test_in_llm_methods_keep_original_positions():
  assert _cfg("fastv").positions == "original" and _cfg("fastv").steps == ((2, 320),)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method"),
    (dict(method="divprune", family="qwen"), "unknown family"),
    (dict(method="divprune", target=0), "positive int"),
    (dict(method="divprune", alpha=1.0), "unknown override"),
    (dict(method="dart", dart_count="most"), "dart_count"),
    (dict(method="divprune", hparams=3), r"divprune: override hparams must be a dict of hyperparameters .*, got 3"),
    (dict(method="pooling", hparams="grid"), r"pooling: override hparams must be a dict"),
    (dict(method="pdrop", layers=2), r"pdrop: override layers must be a non-empty sequence of ints, got 2"),
    (dict(method="pdrop", layers=(2.5, 8)), r"override layers must be a non-empty sequence of ints"),
    (dict(method="tops", criteria=3), r"tops: override criteria must be a name or a sequence of names, got 3"),
    (dict(method="tops", criteria="relevanse"), r"tops: criteria must be a non-empty subset"),
    (dict(method="tops", stage1_alpha="0.3"), r"tops: override stage1_alpha must be a number, got '0.3'"),
    (dict(method="visionzip", visionzip_cls="no"), r"visionzip: override visionzip_cls must be true or false"),
])
def test_bad_requests_name_the_problem(kwargs, match):
  kwargs = dict(dict(family="llava-next", target=320, num_layers=32), **kwargs)
  method = kwargs.pop("method")
  with pytest.raises(ValueError, match=match):
    pruning.method_config(method, **kwargs)


@pytest.mark.parametrize("fields,match", [
    (dict(method="scope", stage1_budget=8, stage1_scope="crop_divided", stage1_grid="padded", newlines="keep"),
     "no newlines"),
    (dict(method="visionzip", stage1_budget=8, stage1_scope="ratio"), "data-dependent"),
    (dict(method="divprune", stage1_budget=8, stage1_grid="padded"), "crop_fixed"),
    (dict(method="divprune", stage1_budget=8, stage1_scope="per_crop", newlines="candidates"), "candidates"),
    (dict(method="divprune", stage1_budget=8, stage1_relevance="clip_text"), "CDPruner"),
])
def test_inconsistent_layouts_raise(fields, match):
  with pytest.raises(ValueError, match=match):
    pruning.PruningConfig.flat(**fields)


def test_vispruner_uses_cdpruners_per_crop_layout_on_vision_features():
  c = _cfg("vispruner")
  assert (c.stage1_scope, c.stage1_grid, c.newlines, c.stage1_features) == ("crop_fixed", "padded", "drop", "vision")
  assert _cfg("vispruner", family="llava-1.5", target=64).stage1_scope == "global"


def test_prumerge_plus_is_llava_1_5_only_with_the_fixed_branch():
  c = _cfg("prumerge_plus", family="llava-1.5", target=64)
  assert dict(c.stage1_hparams) == {"mode": "fixed", "dedup": False} and c.stage1_scope == "global"
  # The default keeps the official duplicates; the config names it, so its repr (hashed into the runner's row keys,
  # experiments/runner/evaluate.py `run_hash`) differs from the earlier default's ({"mode": "fixed"}, deduplicated)
  # and from the dedup=True variant.
  old = dataclasses.replace(c, stage1=dataclasses.replace(c.stage1, params={"mode": "fixed"}))
  dedup = _cfg("prumerge_plus", family="llava-1.5", target=64, dedup=True)
  assert dict(dedup.stage1_hparams)["dedup"] is True
  assert len({repr(c), repr(old), repr(dedup)}) == 3 and "('dedup', False)" in repr(c)
  with pytest.raises(ValueError, match="dedup applies to the fixed branch"):
    _cfg("prumerge_plus", family="llava-1.5", target=64, mode="adaptive", dedup=True)
  assert dict(_cfg("prumerge_plus", family="llava-1.5", target=64, mode="adaptive").stage1_hparams)["mode"] == \
      "adaptive"
  with pytest.raises(ValueError, match="no llava-next protocol"):
    _cfg("prumerge_plus")


def test_pdrop_average_tokens_match_the_budget_and_small_budgets_have_no_protocol():
  c = _cfg("pdrop", family="llava-1.5", target=64)
  assert [layer for layer, _ in c.steps] == [2, 8, 16] and c.method == "pdrop"
  kept = [576] * 2 + [int(576 * r) for r, n in zip(c.stage2_ratios, (6, 8, 16)) for _ in range(n)]
  assert abs(sum(kept) / 32 - 64) < 3                  # PyramidDrop's "average visual tokens per layer"
  with pytest.raises(pruning.NoProtocol, match="pdrop at target=32"):
    _cfg("pdrop", family="llava-1.5", target=32)
  with pytest.raises(pruning.NoProtocol, match="testbed"):
    _cfg("pdrop", family="testbed", target=20)


def test_pdrop_published_setting_is_270_of_576_not_192():
  # The published scripts' lambda 0.5 on (8, 16, 24) counted by the measure T names: layers 0-7 see all 576 tokens,
  # 8-15 288, 16-23 144, 24-31 72, i.e. 270 per layer on average. T = 270 gives that schedule back; T = 192 is
  # another setting (lambda 0.25).
  published = pruning.pdrop_schedule(32)
  kept = [576] * 8 + [keep for _, keep in published.steps for _ in range(8)]
  assert sum(kept) / 32 == 270 == pdrop_method.published_budget(32)
  assert pdrop_method.published_budget(32, "llava-next") == 1350 and pdrop_method.published_budget(40) == 230
  for family, t in (("llava-1.5", 270), ("llava-next", 1350)):
    c = _cfg("pdrop", family=family, target=t)
    assert [layer for layer, _ in c.steps] == [8, 16, 24] and c.stage2_ratios == (0.5, 0.25, 0.125)
  assert _cfg("pdrop", family="llava-1.5", target=192).stage2_ratios[0] == 0.25
  with pytest.raises(ValueError, match="too shallow"):
    pdrop_method.published_budget(20)


def test_sparsevlm_has_only_its_published_llava_1_5_settings():
  c = _cfg("sparsevlm", family="llava-1.5", target=128)
  assert [layer for layer, _ in c.steps] == [2, 6, 15, 19]
  assert (c.stage2_raters, c.stage2_timing) == ("sparsevlm", "after")
  for family, target in (("llava-1.5", 32), ("llava-next", 320)):
    with pytest.raises(pruning.NoProtocol):
      _cfg("sparsevlm", family=family, target=target)


def test_a_budget_below_one_token_per_crop_is_named():
  with pytest.raises(ValueError, match=r"target // 5 tokens per crop: target=4 leaves 0"):
    _cfg("cdpruner", target=4)
  assert _cfg("cdpruner", target=4, scope="global").stage1_budget == 4


def test_every_named_override_has_a_kind():
  for method in pruning.OFFICIAL_METHODS:
    for name in pruning.overrides_of(method):
      kind, what = pruning.override_kind(name)
      assert kind in ("number", "int", "bool", "str", "ints", "strs", "dict") and what, (method, name)


def test_one_criterion_is_a_tuple_of_one():
  assert dict(_cfg("tops", criteria="relevance").stage1_hparams)["criteria"] == ("relevance",)
