"""The runner builds every run from `pruning.method_config`: official protocols, --overrides, CDPruner's CLIP flag."""

import dataclasses

import pytest

from experiments import testbed
from experiments.runner import plan
from models import pruning


@pytest.fixture(scope="module")
def model():
  hf = testbed.hf_config(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
                         text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1))
  return testbed.make_model(hf, seed=0)


def _resolve(model, tmp_path, **fields):
  run = dataclasses.replace(plan.RunConfig(checkpoint=str(tmp_path), budgets=("20",)), **fields)
  return plan.resolve(run, model)


def test_every_run_is_the_methods_official_protocol(model, tmp_path):
  _, runs = _resolve(model, tmp_path)
  by_method = {r.method: r for r in runs if r.target}
  assert set(by_method) == {m for m in plan.RUNNABLE if pruning.supports(m, "testbed")} - {"pdrop"}
  assert "prumerge_plus" not in by_method and "vispruner" in by_method   # PruMerge+ is LLaVA-1.5 only
  layers = model.config.text.num_hidden_layers
  for method, spec in by_method.items():
    if method in ("cdpruner", "pooling"):
      continue
    assert spec.config == pruning.method_config(method, family="testbed", target=20, num_layers=layers), method
  assert by_method["divprune"].config.stage1_scope == "ratio"
  assert by_method["dart"].config.steps == ((2, 4 + 8 * (20 // 8)),)


def test_testbed_cdpruner_runs_the_labelled_fallback(model, tmp_path):
  _, runs = _resolve(model, tmp_path, methods=("cdpruner",))
  spec = runs[1]
  assert spec.label == "cdpruner-text" and spec.name == "cdpruner-text@T=20"
  assert spec.config.stage1_relevance == "text" and spec.config.stage1_scope == "crop_fixed"


def test_overrides_reach_the_config(model, tmp_path):
  _, runs = _resolve(model, tmp_path, methods=("divprune", "dart"),
                     overrides=("divprune.scope=global", "dart.dart_count=exact"))
  configs = {r.method: r.config for r in runs if r.target}
  assert (configs["divprune"].stage1_scope, configs["divprune"].newlines) == ("global", "drop")
  assert configs["dart"].steps == ((2, 20),)


@pytest.mark.parametrize("items,match", [
    (["divprune"], "must read method.name=value"),
    (["nope.scope=global"], "unknown method"),
    (["divprune.alpha=1"], "divprune takes"),
])
def test_bad_overrides_name_the_entry(items, match):
  with pytest.raises(ValueError, match=match):
    plan.parse_overrides(items)


def test_an_override_for_a_method_not_run_is_an_error(model, tmp_path):
  with pytest.raises(ValueError, match="--overrides names scope"):
    _resolve(model, tmp_path, methods=("divprune",), overrides=("scope.scope=global",))


def test_cdpruner_on_a_llava_backbone_needs_the_clip_checkpoint(model, tmp_path):
  ctx = plan.MethodContext(family="llava-next")
  assert not plan.cdpruner_fallback(ctx)
  assert plan.cdpruner_fallback(dataclasses.replace(ctx, overrides={"cdpruner": {"relevance": "text"}}))
  run = plan.RunConfig(backbone="llava_next", checkpoint=str(tmp_path), methods=("cdpruner",), budgets=("20",))
  with pytest.raises(ValueError, match="--clip_checkpoint"):
    plan.resolve(run, model)
  _, runs = plan.resolve(dataclasses.replace(run, clip_checkpoint=str(tmp_path)), model)
  assert runs[1].label == "cdpruner" and runs[1].config.stage1_relevance == "clip_text"
  _, runs = plan.resolve(dataclasses.replace(run, overrides=("cdpruner.relevance=text",)), model)
  assert runs[1].label == "cdpruner-text"


def test_parse_values():
  got = plan.parse_overrides(["tops.stage2_lam=0.7", "visionzip.visionzip_cls=false", "divprune.newlines=rows"])
  assert got == {"tops": {"stage2_lam": 0.7}, "visionzip": {"visionzip_cls": False}, "divprune": {"newlines": "rows"}}


def test_a_method_without_a_protocol_on_the_backbone_is_named(model, tmp_path):
  with pytest.raises(ValueError, match="prumerge_plus has no protocol on --backbone=testbed"):
    _resolve(model, tmp_path, methods=("prumerge_plus",))


def test_all_leaves_out_runs_without_a_protocol_and_names_them(model, tmp_path):
  resolved, runs = _resolve(model, tmp_path)
  names = {r.method for r in runs}
  assert "pdrop" not in names and "sparsevlm" not in names
  assert any(s.startswith("pdrop@T=20: ") and "testbed" in s for s in resolved.skipped)
  assert "sparsevlm" not in resolved.methods                 # no protocol on the family at all
  with pytest.raises(ValueError, match="--method=pdrop: pdrop prunes at decoder layers"):
    _resolve(model, tmp_path, methods=("pdrop",))
