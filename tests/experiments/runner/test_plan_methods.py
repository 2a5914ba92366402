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


# --- every bad flag is named when it is read (issue 27) ---------------------------------------------------------------

def test_no_tasks_is_a_flag_error(model, tmp_path):
  with pytest.raises(ValueError, match="--tasks is empty: name at least one task"):
    _resolve(model, tmp_path, tasks=())


@pytest.mark.parametrize("fields,match", [
    (dict(tops=plan.TopsOptions(alpha=0.3), overrides=("tops.stage1_alpha=0.7",)),
     r"--alpha=0.3 and --overrides=tops.stage1_alpha=0.7 set the same tops setting: give one"),
    (dict(tops=plan.TopsOptions(stage2_lam=0.3), overrides=("tops.stage2_lam=0.3",)),
     r"--stage2_lam=0.3 and --overrides=tops.stage2_lam=0.3"),
    (dict(tops=plan.TopsOptions(normalize="mean"), overrides=("tops.normalize=minmax",)),
     r"--normalize=mean and --overrides=tops.normalize=minmax"),
    (dict(ablation=True, overrides=("tops.criteria=relevance",)), r"--ablation .* and --overrides=tops.criteria"),
    (dict(overrides=("tops.stage1_alpha=0.3", "tops.stage1_alpha=0.7")),
     r"entries 'tops.stage1_alpha=0.3' and 'tops.stage1_alpha=0.7' both set tops.stage1_alpha"),
])
def test_a_setting_given_twice_names_both(model, tmp_path, fields, match):
  with pytest.raises(ValueError, match=match):
    _resolve(model, tmp_path, methods=("tops",), **fields)


@pytest.mark.parametrize("item,match", [
    ("divprune.hparams=3", r"'divprune.hparams=3': hparams takes a dict of hyperparameters .*, spelled name:value"),
    ("tops.stage2_hparams=dense", r"stage2_hparams takes a dict of hyperparameters"),
    ("pooling.hparams=true", r"'pooling.hparams=true': hparams takes a dict"),
    ("pdrop.layers=2.5", r"'pdrop.layers=2.5': layers takes a non-empty sequence of ints, spelled 2\+8\+16"),
    ("pdrop.layers=", r"layers takes a non-empty sequence of ints"),
    ("pdrop.num_visual=many", r"num_visual takes an int"),
    ("tops.stage1_alpha=high", r"stage1_alpha takes a number"),
    ("visionzip.visionzip_cls=3", r"visionzip_cls takes true or false"),
])
def test_overrides_of_the_wrong_kind_name_the_entry_and_the_kind(item, match):
  with pytest.raises(ValueError, match=match):
    plan.parse_overrides([item])


def test_sequences_and_dicts_are_spelled_with_plus():
  got = plan.parse_overrides(["pdrop.layers=2+8+16", "tops.criteria=relevance+diversity",
                              "tops.hparams=engine:dense+chunk:64", "cdpruner.relevance=none", "tops.normalize=none"])
  assert got == {"pdrop": {"layers": (2, 8, 16)}, "cdpruner": {"relevance": "none"},
                 "tops": {"criteria": ("relevance", "diversity"), "hparams": {"engine": "dense", "chunk": 64},
                          "normalize": "none"}}   # "none" is a value of these strings, not "unset"


def test_a_tops_criteria_override_is_checked_before_any_example(model, tmp_path):
  _, runs = _resolve(model, tmp_path, methods=("tops",), overrides=("tops.criteria=relevance",))
  assert dict(runs[1].config.stage1_hparams)["criteria"] == ("relevance",)
  assert dict(runs[1].config.stage2_hparams)["criteria"] == ("relevance",)
  with pytest.raises(ValueError, match=r"tops: criteria must be a non-empty subset of .*'relevanse'"):
    _resolve(model, tmp_path, methods=("tops",), overrides=("tops.criteria=relevanse",))


def test_all_without_a_clip_checkpoint_skips_cdpruner_and_names_it(model, tmp_path):
  run = plan.RunConfig(backbone="llava_next", checkpoint=str(tmp_path), budgets=("20",),
                       tops=plan.TopsOptions(stage2_alpha=0.5, stage2_lam=0.5))   # no paper setting on 4 layers
  resolved, runs = plan.resolve(run, model)
  assert "cdpruner" not in {r.method for r in runs} and {"tops", "divprune", "visionzip"} <= {r.method for r in runs}
  assert [s for s in resolved.skipped if s.startswith("cdpruner")] == [
      f"cdpruner@T=20: {plan._NEEDS_CLIP}"]   # pylint: disable=protected-access
  assert "--clip_checkpoint=DIR" in plan._NEEDS_CLIP   # pylint: disable=protected-access
  with pytest.raises(ValueError, match="--clip_checkpoint"):     # asked for by name, it is still an error
    plan.resolve(dataclasses.replace(run, methods=("cdpruner",), tops=plan.TopsOptions()), model)
