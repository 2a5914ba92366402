"""The methods' official tables, moved out of `tops_jax` into `models.pruning.methods` (SparseVLM's schedules)."""

import pytest

from models.pruning.methods import sparsevlm as sparsevlm_method
from models.pruning.methods import visionzip as visionzip_method
from tops_jax import sparsevlm as sv


def test_official_schedules():
  v1 = {b: sparsevlm_method.schedule("llava-1.5", b) for b in (192, 128, 64)}
  assert [s.layer for s in v1[192].steps] == [2, 6, 15, 19]
  assert {b: (s.steps[0].scale, s.steps[0].bias) for b, s in v1.items()} == {192: (13.5, 0.0), 128: (9.0, 6.0),
                                                                             64: (0.8, 0.0)}
  v15 = {b: sparsevlm_method.schedule("llava-1.5", b, "v1.5") for b in (192, 128, 96, 64)}
  assert {b: tuple((st.layer, st.count) for st in s.steps) for b, s in v15.items()} == {
      192: ((2, 300), (6, 200), (15, 110)), 128: ((2, 303), (6, 110), (15, 36)),
      96: ((2, 238), (6, 48), (15, 26)), 64: ((2, 66), (6, 30), (15, 17))}
  # The budget is the official printed mean of v_token_num over the 32 layers, where the pruning layer p already
  # counts with its new number (forward appends v_token_num after the update): layers [0, p1) see 576.
  for b, s in v15.items():
    counts = [576] + [st.count for st in s.steps]
    bounds = [0] + [st.layer for st in s.steps] + [32]
    mean = sum(c * (hi - lo) for c, lo, hi in zip(counts, bounds[:-1], bounds[1:])) / 32
    assert 0.95 * b <= mean <= b            # recycled clusters add the rest


def test_visionzip_official_splits():
  assert visionzip_method.SPLITS["llava"] == {64: (54, 10), 128: (108, 20), 192: (162, 30)}
  assert visionzip_method.SPLITS["llava_next"] == {640: (108, 20), 320: (54, 10), 160: (27, 5)}


def test_official_schedule_sizes():
  chained = sv.sizes(sparsevlm_method.schedule("llava-1.5", 192, "v1.5"), 576, 40)
  assert [s.keep for s in chained] == [300, 200, 110]
  assert chained[0] == sv.Sizes(300, 276, 83, 9, 309)


def test_schedule_errors():
  with pytest.raises(ValueError, match="LLaVA-NeXT"):
    sparsevlm_method.schedule("llava-next", 640)
  with pytest.raises(ValueError, match="budget=100"):
    sparsevlm_method.schedule("llava-1.5", 100)
  with pytest.raises(ValueError, match="version"):
    sparsevlm_method.schedule("llava-1.5", 192, "v3")
  with pytest.raises(ValueError, match="family"):
    sparsevlm_method.schedule("qwen", 192)


def _runner_reprs():
  """The repr of every config the runner builds (its row keys hash them, `experiments.evaluate.run_hash`)."""
  from models import pruning  # pylint: disable=g-import-not-at-top
  out = []
  for family, targets, layers in (("llava-1.5", (128, 64, 32), 32), ("llava-next", (640, 320, 160), 32),
                                  ("testbed", (20, 12), 3)):
    for method in pruning.OFFICIAL_METHODS:
      for t in targets:
        try:
          out.append(repr(pruning.method_config(method, family=family, target=t, num_layers=layers)))
        except ValueError as e:
          out.append(f"{method} {family} {t}: {type(e).__name__}")
  for kw in (dict(scope="global"), dict(scope="per_crop"), dict(newlines="keep"), dict(relevance="text")):
    out.append(repr(pruning.method_config("divprune", family="llava-next", target=320, num_layers=32, **kw)))
  out.append(repr(pruning.method_config("tops", family="llava-next", target=320, num_layers=32,
                                        criteria=("relevance", "diversity"), normalize="minmax", scope="per_crop",
                                        newlines="rows")))
  out.append(repr(pruning.method_config("dart", family="llava-1.5", target=64, num_layers=32, dart_count="exact")))
  out.append(repr(pruning.method_config("visionzip", family="llava-next", target=320, num_layers=32,
                                        visionzip_cls=False)))
  out.append(repr(pruning.PruningConfig(method="tops")))
  out.append(repr(pruning.tops_schedule(40, 64)))
  out.append(repr(pruning.pdrop_schedule(32, 128)))
  out.append(repr(pruning.sparsevlm_schedule(32, 64, version="v1.5")))
  return out


def test_configs_keep_the_flat_repr_that_row_keys_hash():
  """Results written with the flat config resume: every config the runner builds has the repr it had then (the
  hash below was computed with the flat PruningConfig of ad29412, the commit before the typed one)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  reprs = _runner_reprs()
  assert len(reprs) == 123
  # Issue 27 changed one default on purpose: PruMerge+ keeps the official duplicates and its config names
  # dedup=False, so its rows (computed with the deduplicating default) are not reused. Every other repr is unchanged.
  before = [r.replace("(('dedup', False), ('mode', 'fixed'))", "(('mode', 'fixed'),)") for r in reprs]
  assert sum(r != b for r, b in zip(reprs, before)) == 3          # LLaVA-1.5 at 128 / 64 / 32
  assert hashlib.sha1("\n".join(before).encode()).hexdigest() == "c2dff469c8420ef877154ea3cbf935b79d2a5493"


def test_typed_and_flat_spellings_build_one_config():
  from models import pruning  # pylint: disable=g-import-not-at-top
  typed = pruning.PruningConfig("tops", stage1=pruning.Stage1(budget=8, layout=pruning.Layout.PER_CROP,
                                                              params={"alpha": 0.5, "lam": 1.0}),
                                stage2=pruning.Stage2(steps=((1, 4),), params={"alpha": 0.5, "lam": 0.5}))
  flat = pruning.PruningConfig.flat("tops", stage1_budget=8, stage1_scope="per_crop", stage2=((1, 4),),
                                    stage1_hparams={"alpha": 0.5, "lam": 1.0},
                                    stage2_hparams={"alpha": 0.5, "lam": 0.5})
  assert typed == flat and hash(typed) == hash(flat) and typed.static() == flat.static()
  assert typed.stage1.params.alpha == 0.5 and typed.stage1.params.traced() == {"alpha": 0.5, "lam": 1.0}
  assert pruning.FULL == pruning.PruningConfig.full() == pruning.PruningConfig(method="tops")
  assert pruning.FULL.is_full and pruning.FULL.stage1 is None and pruning.FULL.stage2 is None
  assert pruning.Layout.of("crop_fixed", "padded", visionzip_cls=True) is pruning.Layout.VISIONZIP_CLS
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    pruning.PruningConfig("tops", stage1=pruning.Stage1(budget=8, params={"beta": 1.0}))
  with pytest.raises(ValueError, match="Stage2 needs at least one"):
    pruning.Stage2(steps=())
