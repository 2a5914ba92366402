"""Linear probes of what a testbed model's visual tokens encode (the library of `experiments.testbed.probe`).

See that script's docstring for what the five probes measure and how to read them.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from experiments.synthvqa import vqa
from experiments.testbed import batches
from experiments.testbed import losses
from experiments.testbed import model as model_lib
from models import anyres


def ridge_fit(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
  """Least squares with an L2 penalty (the bias column is appended, unpenalised): weights float64[D + 1, ...]."""
  if x.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"ridge_fit needs x [N, D] and y [N, ...] with the same N, got {x.shape} and {y.shape}")
  xb = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
  penalty = ridge * np.eye(xb.shape[1])
  penalty[-1, -1] = 0.0
  return np.linalg.solve(xb.T @ xb + penalty, xb.T @ y.astype(np.float64))


def ridge_predict(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
  return np.concatenate([x, np.ones((len(x), 1))], 1) @ weights


def held_out_r2(x: np.ndarray, y: np.ndarray, ridge: float) -> float:
  """R^2 on the second half of a ridge fit on the first half (y: [N] or [N, K]; mean over K)."""
  n = len(x) // 2
  pred = ridge_predict(ridge_fit(x[:n], y[:n], ridge), x[n:])
  residual = ((y[n:] - pred) ** 2).sum(0)
  total = ((y[n:] - y[n:].mean(0)) ** 2).sum(0)
  return float(np.mean(1.0 - residual / np.maximum(total, 1e-12)))


def held_out_accuracy(x: np.ndarray, labels: np.ndarray, ridge: float) -> float:
  """Sign accuracy on the second half of a ridge fit of +-1 targets (bool `labels`) on the first half."""
  n = len(x) // 2
  target = np.where(labels, 1.0, -1.0)
  pred = ridge_predict(ridge_fit(x[:n], target[:n], ridge), x[n:])
  return float(np.mean((pred > 0) == labels[n:]))


class _Batch(NamedTuple):
  evidence_mass: np.ndarray  # float[2 layers, 2 heads, B]
  tower: np.ndarray          # float[B, T, Dv] base-crop tower output (CLS dropped)
  projected: np.ndarray      # float[B, T, D] the same tokens after the projector
  pair: np.ndarray           # float[B, D] mean embedding of object A minus object B (base-crop tokens)
  residual: np.ndarray       # float[L + 1, B, D] residual stream at the answer position around each decoder layer


def _relation(example: vqa.Example) -> tuple[str, bool]:
  """("horizontal" | "vertical", A is left of / above B)."""
  rel = example.subtype  # the asked relation
  yes = example.answer == "yes"
  return ("horizontal", (rel == "left") == yes) if rel in ("left", "right") else ("vertical", (rel == "above") == yes)


def _probe_batch(model, processor, hf, examples) -> _Batch:
  batch = batches.encode(examples, processor, hf, with_answer=True, labels=True)
  arrays = {k: (v if k == "layout" else jnp.asarray(v)) for k, v in batch.items()}
  layers = losses.grounding_layers(model.config.text.num_hidden_layers)[1:]
  answer = arrays["target_positions"][:, :1]                                # the position that predicts the answer
  out = model_lib.forward(model, arrays, answer, attention_layers=layers,
                        attention_queries=arrays["grounding_queries"], train_vision=False, residual_positions=answer)
  attention = np.asarray(out.attention)[:, :, :2, -1]                        # [L, B, 2, S] at the answer position
  evidence = batch["head_evidence"]                                         # [B, 2, S]
  mass = np.einsum("lbhs,bhs->lhb", attention, evidence)
  features = out.features                                                   # [B, P, T, Dv] (CLS dropped)
  projected = model.project(features)                                      # [B, P, T, D]
  layout = anyres.PackLayout(*(jnp.asarray(a) for a in batch["layout"]))
  embedded = np.asarray(model.embed(arrays["input_ids"], model.pack(projected, layout), layout.valid))
  means = [(embedded * evidence[:, h, :, None]).sum(1) / np.maximum(evidence[:, h].sum(-1, keepdims=True), 1)
           for h in (0, 1)]
  return _Batch(mass, np.asarray(features[:, 0]), np.asarray(projected[:, 0]), means[0] - means[1],
                np.asarray(out.residuals[:, :, 0]))


def probe(model, examples, batch_size: int = 32, ridge: float = 1.0) -> dict:
  """The five probes of `experiments.testbed.probe` on spatial `examples` -> a flat dict of floats."""
  if len(examples) < 8 or any(e.family != "spatial" for e in examples):
    raise ValueError(f"probe needs at least 8 examples, all spatial; got {len(examples)}")
  hf = model_lib.hf_from_model(model)
  processor = model_lib.make_processor(hf)
  parts = [_probe_batch(model, processor, hf, examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
  mass = np.concatenate([q.evidence_mass for q in parts], -1)
  result = {f"evidence_mass_layer{l}_head{h}": float(mass[i, h].mean())
            for i, l in enumerate(losses.grounding_layers(model.config.text.num_hidden_layers)[1:]) for h in (0, 1)}
  where = np.tile(losses.position_targets(parts[0].tower.shape[1]), (len(examples), 1)).astype(np.float64)
  for name in ("tower", "projected"):
    tokens = np.concatenate([getattr(q, name) for q in parts]).reshape(-1, getattr(parts[0], name).shape[-1])
    result[f"position_r2_{name}"] = held_out_r2(tokens, where, ridge)
  pairs = np.concatenate([q.pair for q in parts])
  residual = np.concatenate([q.residual for q in parts], axis=1)                # [L + 1, N, D]
  axes, labels = zip(*(_relation(e) for e in examples))
  labels = np.array(labels)
  towards = np.array([e.subtype in ("left", "above") for e in examples])   # the asked direction within its axis
  for axis in ("horizontal", "vertical"):
    pick = np.array([a == axis for a in axes])
    if pick.sum() >= 8:
      result[f"relation_accuracy_{axis}"] = held_out_accuracy(pairs[pick], labels[pick], ridge)
      for layer, stream in enumerate(residual):
        result[f"residual_relation_accuracy_layer{layer}_{axis}"] = held_out_accuracy(stream[pick], labels[pick], ridge)
        result[f"residual_direction_accuracy_layer{layer}_{axis}"] = held_out_accuracy(
            stream[pick], towards[pick], ridge)
  return result
