"""The methods' official tables, moved out of `tops_jax` into `models.pruning.methods` (SparseVLM's schedules)."""

import pytest

from models.pruning.methods import sparsevlm as sparsevlm_method
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
