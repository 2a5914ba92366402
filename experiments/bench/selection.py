r"""Selection speed: every selector compiled, and TOPS / DivPrune against eager step-by-step versions.

    python -m experiments.bench.selection                       # the full grid of the issue (long on a CPU)
    python -m experiments.bench.selection --n=2880 --keep=1280 --methods=tops --dtypes=float32

Grid: N in --n, keep in --keep (pairs with keep > N are skipped), D = --d, dtypes in --dtypes. Each compiled timing
is the median of --repeats calls after one warm-up call (compilation excluded), with `block_until_ready`. For TOPS and
DivPrune the same run also times eager implementations written the way the peer PyTorch repos write them (tensor ops
per greedy step, N x N temporaries, Python loop), in NumPy and, when installed, PyTorch, and prints the ratio
eager / compiled. Ratios are the claim; absolute times mean something only with the device named (printed).
"""

import json
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from tops_jax import prune

_N = flags.DEFINE_list("n", ["576", "2880"], "Token counts N.")
_KEEP = flags.DEFINE_list("keep", ["64", "128", "256", "640", "1280"], "Budgets K (pairs with K > N are skipped).")
_D = flags.DEFINE_integer("d", 4096, "Feature width D.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Feature dtypes.")
_METHODS = flags.DEFINE_list("methods", list(prune.METHODS), "Selectors to time.")
_EAGER = flags.DEFINE_list("eager", ["numpy", "torch"], "Eager references for tops and divprune.")
_EAGER_MAX_KEEP = flags.DEFINE_integer("eager_max_keep", 100_000, "Skip eager references above this keep.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (median reported).")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSONL file for the rows.")
_SEED = flags.DEFINE_integer("seed", 0, "Input seed.")
_ENGINES = flags.DEFINE_list("engines", ["incremental"], "Coverage engines of tops and scope to time side by side "
                             "(incremental, dense); rows after the first engine say whether the picks are the same.")


# --- eager references, in the peers' style: one tensor expression per criterion per greedy step ---------------------

def tops_numpy(features, relevance, keep, alpha=0.5, lam=0.5):
  f = features.astype(np.float32)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  sim = f @ f.T
  n = sim.shape[0]
  selected = [int(np.argmax(relevance))]
  remaining = np.ones(n, bool)
  remaining[selected[0]] = False
  best = sim[:, selected[0]].copy()
  while len(selected) < keep:
    div = 1.0 - best
    cov = (np.clip(sim - best[None, :], 0, None) * remaining[None, :]).sum(1)
    cand = remaining
    score = (relevance / relevance[cand].mean() + alpha * div / div[cand].mean()
             + lam * cov / max(cov[cand].mean(), 1e-12))
    score[~cand] = -np.inf
    i = int(np.argmax(score))
    selected.append(i)
    remaining[i] = False
    best = np.maximum(best, sim[:, i])
  return np.array(selected)


def tops_torch(features, relevance, keep, alpha=0.5, lam=0.5):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    sim = f @ f.T
    n = sim.shape[0]
    selected = [int(torch.argmax(relevance))]
    remaining = torch.ones(n, dtype=torch.bool)
    remaining[selected[0]] = False
    best = sim[:, selected[0]].clone()
    while len(selected) < keep:
      div = 1.0 - best
      cov = ((sim - best[None, :]).clamp(min=0) * remaining[None, :]).sum(1)
      score = (relevance / relevance[remaining].mean() + alpha * div / div[remaining].mean()
               + lam * cov / cov[remaining].mean().clamp(min=1e-12))
      score[~remaining] = -torch.inf
      i = int(torch.argmax(score))
      selected.append(i)
      remaining[i] = False
      best = torch.maximum(best, sim[:, i])
    return torch.tensor(selected)


def divprune_numpy(features, keep):
  f = features.astype(np.float32)
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  dist = 1.0 - f @ f.T
  selected = []
  for step in range(keep):
    if step == 0:
      rows = dist
      score = np.sort(rows, axis=0)[1]  # nearest neighbour other than itself
    else:
      rows = dist[np.array(selected)]
      score = rows.min(0)
    score[selected] = -np.inf
    selected.append(int(np.argmax(score)))
  return np.array(selected)


def divprune_torch(features, keep):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - f @ f.T
    selected = torch.empty(keep, dtype=torch.long)
    for step in range(keep):
      if step == 0:
        score = torch.topk(dist, 2, dim=0, largest=False).values[1]
      else:
        score = torch.index_select(dist, 0, selected[:step]).min(0).values
      score[selected[:step]] = -torch.inf
      selected[step] = torch.argmax(score)
    return selected


# --- timing ----------------------------------------------------------------------------------------------------------

def _median_seconds(fn, repeats, warmup=True):
  """(median seconds over `repeats` calls, last result)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), result


def _kwargs(method, relevance, key):
  spec = prune.METHODS[method]
  kwargs = {}
  if spec.needs_relevance or method in ("tops", "trimtokenator"):
    kwargs["relevance"] = relevance
  if spec.needs_key:
    kwargs["key"] = key
  if method == "pooling":
    kwargs["grid"] = None
  return kwargs


def _inputs(n, d, dtype, seed):
  rng = np.random.default_rng(seed)
  # Clustered features, like real visual tokens (many near-duplicates), rather than isotropic noise.
  centres = rng.normal(size=(max(8, n // 16), d)).astype(np.float32)
  features = centres[rng.integers(0, len(centres), size=n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
  relevance = rng.uniform(size=n).astype(np.float32)
  return features, relevance, jnp.asarray(features, dtype=dtype), jnp.asarray(relevance)


def main(argv):
  del argv
  device = jax.devices()[0]
  device_name = f"{device.platform}:{device.device_kind}"
  if device.platform == "cpu":
    device_name += f" ({platform.processor() or platform.machine()}, {jax.local_device_count()} device(s))"
  print(f"device: {device_name}; jax {jax.__version__}; D={_D.value}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
  except ImportError:
    torch = None
    torch_version = None
  eager = [e for e in _EAGER.value if e == "numpy" or (e == "torch" and torch is not None)]
  rows = []
  out = open(_OUTPUT.value, "a") if _OUTPUT.value else None
  header = f"{'method':<22}{'dtype':<10}{'N':>6}{'keep':>6}{'compiled ms':>13}" + "".join(
      f"{e + ' ms':>12}{'x':>7}" for e in eager)
  print(header)
  key = jax.random.key(_SEED.value)
  for n in map(int, _N.value):
    for dtype in _DTYPES.value:
      f_np, r_np, features, relevance = _inputs(n, _D.value, dtype, _SEED.value)
      for keep in map(int, _KEEP.value):
        if keep > n:
          continue
        for method, engine in [(m, e) for m in _METHODS.value
                               for e in (_ENGINES.value if m in ("tops", "scope") else [None])]:
          if method == "pooling" and int(round(n ** 0.5)) ** 2 != n:
            continue  # spatial pooling needs a grid; N=2880 is 5 crops (pooled per crop in the model hooks)
          kwargs = _kwargs(method, relevance, key)
          kwargs.pop("grid", None)
          static = {} if engine is None else dict(engine=engine)
          fn = jax.jit(lambda f, kw, m=method, k=keep, st=static: prune.select(m, f, keep=k, **kw, **st))
          compiled, got = _median_seconds(lambda: fn(features, kwargs).block_until_ready(), _REPEATS.value)
          row = dict(method=method, dtype=dtype, n=n, keep=keep, d=_D.value, compiled_s=compiled, device=device_name,
                     torch=torch_version)
          label = method if engine is None else f"{method}[{engine}]"
          line = f"{label:<22}{dtype:<10}{n:>6}{keep:>6}{compiled * 1e3:>13.1f}"
          if engine is not None:
            row["engine"] = engine
            if engine == _ENGINES.value[0]:
              first = (np.asarray(got), compiled)
            else:
              row["same_picks"] = bool(np.array_equal(np.asarray(got), first[0]))
              row["x_first"] = compiled / first[1]
              line += f"  same picks: {row['same_picks']}, {row['x_first']:.1f}x the {_ENGINES.value[0]} time"
          if method in ("tops", "divprune") and keep <= _EAGER_MAX_KEEP.value and engine in (None, _ENGINES.value[0]):
            for e in eager:
              if e == "numpy":
                # The eager references see the same (possibly bf16-rounded) values the compiled selector sees.
                f_in = np.array(features.astype(jnp.float32))
                ref = (lambda: tops_numpy(f_in, r_np, keep)) if method == "tops" else (
                    lambda: divprune_numpy(f_in, keep))
              else:
                tf = torch.from_numpy(np.array(features.astype(jnp.float32)))
                if dtype == "bfloat16":
                  tf = tf.to(torch.bfloat16)
                tr = torch.from_numpy(r_np)
                ref = (lambda: tops_torch(tf, tr, keep)) if method == "tops" else (lambda: divprune_torch(tf, keep))
              seconds, picked = _median_seconds(ref, 1, warmup=False)
              # Same algorithm, so the kept sets should agree up to float near-ties late in the greedy order.
              overlap = len(set(np.asarray(got).tolist()) & set(np.asarray(picked).tolist())) / keep
              row[f"{e}_s"] = seconds
              row[f"{e}_ratio"] = seconds / compiled
              row[f"{e}_overlap"] = overlap
              line += f"{seconds * 1e3:>12.1f}{seconds / compiled:>7.1f}"
              line += f" ({overlap:.0%} same)"
          print(line, flush=True)
          rows.append(row)
          if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
  if out:
    out.close()


if __name__ == "__main__":
  app.run(main)
