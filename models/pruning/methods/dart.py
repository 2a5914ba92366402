"""DART (duplication-aware token reduction): its official count and protocol, and its Stage II inputs.

Source: ZichenWen1/DART and its llmc port (`dart.py`): pruning before layer 2 (scored from layer 1's keys) to
max_num_trunction = 4 + 8 floor(target / 8) tokens (`tops_jax.dart.kept_count`), original positions; pivots by the L1
norm of the keys, the kept tokens the least similar to the pivots over the final-norm hidden states.
Qwen2.5-VL: the same layer and count (DART's own Qwen2.5-VL port, `Qwen2_5-VL/`, was not read: its README gives only a
reduction ratio); positions="contiguous" raises there (`base.check_positions`).
"""

from models.pruning import sequence
from models.pruning.methods import base
from models.pruning.modes import Stage2
from tops_jax import dart as dart_lib

__all__ = ["METHOD", "protocol", "stage2_inputs"]


def protocol(target: int, family: str, num_layers: int, o: dict) -> tuple[None, Stage2]:
  """Pruning before layer 2 to 4 + 8 floor(target / 8) tokens ("official") or `target` ("exact"), original
  positions."""
  count = o.get("dart_count", "official")
  if count not in ("official", "exact"):
    raise ValueError(f"dart_count must be 'official' or 'exact', got {o['dart_count']!r}")
  keep = dart_lib.kept_count(target) if count == "official" else target
  base.check_positions("dart", family, o.get("positions", "original"))
  return None, Stage2(steps=((2, keep),), relevance="none", positions=o.get("positions", "original"),
                      params=o.get("hparams", {}))


def stage2_inputs(model, seq, scores, feats, hp):
  """The final-norm hidden states as features; the scoring layer's keys, the text after the image and the prompt
  positions (DART visits its pivots in Python set order of their prompt positions, the official loop)."""
  norm = model.language_model.norm
  feats = norm(feats)
  hp.setdefault("keys", sequence.take(scores.keys, scores.visual))
  hp.setdefault("text_features", norm(sequence.take(seq.hidden, scores.text)))
  hp.setdefault("text_keys", sequence.take(scores.keys, scores.text))
  hp.setdefault("text_valid", scores.text_valid)
  hp.setdefault("positions", sequence.take_positions(seq.positions, scores.visual)[0])
  hp.setdefault("text_positions", sequence.take_positions(seq.positions, scores.text)[0])
  return feats, hp


METHOD = base.Method(protocol=protocol, overrides=("dart_count", "hparams", "positions"), scores_previous_layer=True,
                     reads_keys=True, stage2_inputs=stage2_inputs)
