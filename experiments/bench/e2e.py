r"""End-to-end speed: vision tower, selection, prefill, decode and memory of pruned LLaVA and Qwen2.5-VL, beside
transformers.

    python -m experiments.bench.e2e --shape=scaled-next                       # the issue's CPU shape
    python -m experiments.bench.e2e --shape=llava-next-7b --dtype=bfloat16 --batch_sizes=1,8   # GPU
    python -m experiments.bench.e2e --shape=qwen2.5-vl-7b --dtype=bfloat16 --budgets=256,128   # GPU
    python -m experiments.bench.e2e --checkpoint=/ckpt/llava-v1.6-vicuna-7b-hf --dtype=bfloat16
    python -m experiments.bench.e2e --smoke                                   # tiny shapes, one repeat (tests)
    python -m experiments.bench.e2e --smoke --shape=tiny-qwen                 # the same on a tiny Qwen2.5-VL

One process builds the model (a local llava-hf checkpoint, or random weights at a named shape from
`models.shapes.SHAPES`), and for each batch size, method and target (`models.pruning.method_config`, the official
protocol) times, compiled and warm, median of --repeats calls after one warm-up call, `block_until_ready` on every
output:

  vision     the vision tower + projector of every crop (Qwen2.5-VL: the tower and merger on every image's
             patches; the same for every method; timed once per batch size)
  selection  every selection pass of the method at the pipeline's shapes (Stage I over the packed candidates with
             the projector width, each Stage II step over the previous step's tokens with the decoder width),
             jitted `tops_jax.prune.select` calls, vmapped over the batch; methods that only merge or only run inside
             the decoder have no entry. A lower bound of the in-pipeline cost (XLA may overlap inside the prefill).
  prefill    the whole pruned prefill (`models.pruning.prefill` under one jit: tower, Stage I, decoder segments,
             Stage II, the KV cache, last logits): the time to the first token
  decode     per generated token (`models.pruning.decode` of --decode_tokens tokens, no stop token) / tokens
  memory     XLA's `memory_analysis()` of the compiled prefill (arguments + outputs + temporaries; the weights are
             arguments) and, on GPU, the device's peak bytes in use
  compiles   XLA compilations inside the timed loops (must be 0: every shape compiles once, in the warm-up)

Beside them, in the same process on the same inputs, transformers (PyTorch, sdpa attention) at the same shape and
dtype with its own random weights (--torch): the unpruned prefill (`logits_to_keep=1`, with its KV cache) and
decode, and the decoder at the pruned length text + target fed through `inputs_embeds` after the tower (what any
one-shot pre-LLM pruner costs in PyTorch, selection excluded). Ratios are the claim (`speedup` columns); absolute times
mean something only with the device named (printed in every row).

Qwen2.5-VL (`--shape=qwen2.5-vl-7b`, random weights): every image of the batch is `Shape.image_size` (1008 x 1008:
the papers' 1,296 merged tokens), given as the processor gives it (float[Np, E] patches, `image_grid_thw`); text
tokens avoid the image / video / vision-start / vision-end ids. transformers gets `mm_token_type_ids` for its
M-RoPE ids and, when decoding, each step's position ids (the prompt's rope_deltas).

A method with no protocol on the backbone or at a target (`pruning.NoProtocol`, a ValueError from
`method_config` or from `PruningConfig.check_model`) is left out: a "skipped" row names the reason (JSONL and
stdout), and the table lists only what ran.

Rows go to --output (JSONL, one per measurement) and a markdown table to stdout. FLOPs per row come from
`experiments.analysis.flops` (decoder prefill at the row's tokens per layer; the vision row: the tower and projector
as the architecture counts them).
"""

import copy
import dataclasses
import inspect
import json
import platform
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.analysis import flops as flops_lib
from experiments.runner import plan
from models import backbones
from models import generate
from models import loading
from models import pruning
from models import shapes
from tops_jax import prune


def build_jax(hf: dict[str, Any], dtype, seed: int):
  """Our model with random weights, initialised on the device under jit (never materialised on the host)."""
  family = loading.family_of(hf["model_type"])
  config = family.config.from_hf(hf)
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @jax.jit
  def init():
    return nnx.split(family.model(config, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: family.model(config, dtype=dtype, rngs=nnx.Rngs(seed))))
  return nnx.merge(graphdef, init())


@dataclasses.dataclass
class Inputs:
  ids: np.ndarray          # int32[B, S]
  mask: np.ndarray         # bool[B, S]
  pixels: np.ndarray       # float[B, P, 3, H, W] (NeXT) | float[B, 3, H, W] | float[B Np, E] (Qwen2.5-VL patches)
  sizes: np.ndarray        # int[B, 2]
  text: int                # real text tokens per row
  visual: int              # image tokens per row
  grid: np.ndarray | None = None   # int[B, 3] Qwen2.5-VL's image_grid_thw (t, h, w patches); None on LLaVA

  @property
  def layout_input(self) -> np.ndarray:
    """What the family's `model.layout` reads: image_grid_thw (Qwen2.5-VL) or image_sizes."""
    return self.sizes if self.grid is None else self.grid


def _patch_grids(model) -> bool:
  """Whether the family takes the processor's patches and grids (Qwen2.5-VL) rather than images or crops."""
  return backbones.of_model(model).name == "qwen2_5_vl"


def make_inputs(model, batch: int, image_size: tuple[int, int], text_tokens: int, seed: int) -> Inputs:
  """B identical-shape rows: a few text tokens, one image's <image> run, the rest of the text (a POPE-like prompt)."""
  rng = np.random.default_rng(seed)
  config = model.config
  sizes = np.tile(np.asarray(image_size), (batch, 1))
  grid = None
  if _patch_grids(model):
    v = config.vision
    unit = v.patch_size * v.spatial_merge_size
    if image_size[0] % unit or image_size[1] % unit:
      raise ValueError(f"image_size {image_size} must be multiples of {unit} px (patch x merge: what the Qwen2.5-VL "
                       "processor resizes to)")
    grid = np.tile([1, image_size[0] // v.patch_size, image_size[1] // v.patch_size], (batch, 1))
    pixels = rng.standard_normal((int(np.prod(grid, 1).sum()), v.patch_dim)).astype(np.float32)
    visual = int(np.prod(grid[0])) // v.merge_unit
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                  config.vision_end_token_id)
  else:
    crop = config.vision.image_size
    visual = int(np.asarray(model.layout(sizes, batch).counts)[0])
    crops = (config.max_num_crops,) if backbones.of_model(model).pixel_crops else ()
    pixels = rng.standard_normal((batch, *crops, 3, crop, crop)).astype(np.float32)
    special = config.image_token_id
  head = min(5, text_tokens)
  text = rng.integers(3, special, size=(batch, text_tokens))
  image = np.full((batch, visual), config.image_token_id)
  ids = np.concatenate([text[:, :head], image, text[:, head:]], axis=1).astype(np.int32)
  return Inputs(ids, np.ones(ids.shape, bool), pixels, sizes, text_tokens, visual, grid)


def _calls(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = jax.block_until_ready,
           setup: Callable[[], Any] | None = None) -> tuple[float, Any]:
  """Median seconds of `repeats` calls (each after an untimed `setup()` whose result it takes) and the last output."""
  times, out = [], None
  for _ in range(repeats):
    arg = () if setup is None else (setup(),)
    t0 = time.perf_counter()
    out = sync(fn(*arg))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def _median_time(fn, repeats, sync=jax.block_until_ready, setup=None) -> tuple[float, Any]:
  """One warm-up call (compiles, allocates), then `_calls`."""
  sync(fn(*(() if setup is None else (setup(),))))
  return _calls(fn, repeats, sync, setup)


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring's compile-duration event) while active."""
  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs):
    del duration, kwargs
    if self.active and event == self.EVENT:
      self.count += 1

  def timed(self, fn: Callable[[], Any], repeats: int) -> tuple[float, Any, int]:
    """Warm-up call (compiles), then the median of `repeats` calls; returns (seconds, output, compiles in the loop)."""
    jax.block_until_ready(fn())
    self.count, self.active = 0, True
    try:
      seconds, out = _calls(fn, repeats)
    finally:
      self.active = False
    return seconds, out, self.count


def _configs(model, methods, targets, overrides
             ) -> tuple[list[tuple[str, int | None, pruning.PruningConfig]], list[dict[str, Any]]]:
  """(runs, skipped rows): the full model and each method's protocol at each target on this model; a method with
  none here (no protocol, or a config the model refuses) becomes a "skipped" row naming the reason."""
  runs = [("full", None, pruning.PruningConfig(method="tops"))]
  skipped = []
  layers = model.config.text.num_hidden_layers
  family = backbones.of_model(model).name
  for method in methods:
    for target in targets:
      try:
        config = pruning.method_config(method, family=family, target=target, num_layers=layers,
                                       **overrides.get(method, {}))
        config.check_model(model)
        runs.append((method, target, config))
      except (pruning.NoProtocol, ValueError) as e:
        print(f"skipped {method} at target={target}: {e}")
        skipped.append(dict(impl="jax", part="skipped", method=method, T=target,
                            reason=f"{type(e).__name__}: {e}"))
  return runs, skipped


def _accepted(method: str, hparams: dict[str, Any]) -> dict[str, Any]:
  """The hyperparameters `prune.select` takes (Stage I layouts also read their own, e.g. VisionZip's split)."""
  out = {}
  for k, v in hparams.items():
    try:
      prune.check_hparams(method, **{k: v})
      out[k] = v
    except ValueError:
      pass
  return out


def selection_fn(config: pruning.PruningConfig, batch: int, candidates: int, crops: tuple[int, int],
                 dims: tuple[int, int], dtype) -> Callable[[], Any] | None:
  """Every selection pass of `config` at the pipeline's shapes (see the module docstring), or None.

  candidates: packed image tokens per row; crops: (crops per image, tokens per crop) for the per-crop scopes, which
  select a quota of budget // crops tokens in each crop; dims: (Stage I width, decoder width)."""
  passes = []
  if config.stage1_budget is not None and config.method in prune.METHODS:
    hp = _accepted(config.method, dict(config.stage1_hparams))
    if config.stage1_scope in ("global", "ratio"):
      passes.append((config.method, batch, candidates, config.stage1_budget, dims[0], hp))
    else:
      passes.append((config.method, batch * crops[0], crops[1], config.stage1_budget // crops[0], dims[0], hp))
  prev = config.stage1_budget or candidates
  for _, keep in config.steps:
    if config.method2 in prune.METHODS:
      passes.append((config.method2, batch, prev, keep, dims[1], _accepted(config.method2,
                                                                            dict(config.stage2_hparams))))
    prev = keep
  if not passes:
    return None
  key = jax.random.key(0)
  inputs = []
  for i, (method, rows, n, keep, d, hp) in enumerate(passes):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    feats = jax.random.normal(k1, (rows, n, d), dtype)
    rel = jax.nn.softmax(jax.random.normal(k2, (rows, n)), axis=-1)
    needs = prune.needs_relevance(method, **hp)
    inputs.append((method, feats, rel if needs else None, keep, hp))

  def run():
    return [prune.select(m, f, keep=k, relevance=r, key=key, **hp) for m, f, r, k, hp in inputs]
  return run


def jax_rows(model, inputs: Inputs, runs, counter: CompileCounter, repeats: int, decode_tokens: int, device: str,
             dtype) -> list[dict[str, Any]]:
  """One row per (method, target) at this batch size (its "T" key), plus the vision tower row."""
  b = inputs.ids.shape[0]
  text = model.config.text
  layout = model.layout(inputs.layout_input, b)
  pixels = jnp.asarray(inputs.pixels, dtype)
  if inputs.grid is None:
    encode = jax.jit(lambda m, p: m.project(m.encode_images(p, cls_attention=False).features))
    vision_s, _, vision_compiles = counter.timed(lambda: encode(model, pixels), repeats)
  else:
    encode = jax.jit(lambda m, p, lay: m.encode_images(p, None, layout=lay).merged)
    vision_s, _, vision_compiles = counter.timed(lambda: encode(model, pixels, layout.vision), repeats)
  rows = [dict(impl="jax", part="vision", batch=b, vision_ms=vision_s * 1e3, compiles=vision_compiles,
               vision_flops=vision_flops(model, inputs), device=device)]
  ids, mask = jnp.asarray(inputs.ids), jnp.asarray(inputs.mask)
  images = {} if inputs.grid is None else dict(image_grid_thw=inputs.grid)
  full_prefill = None
  for name, target, config in runs:
    common = dict(layout=layout, max_new_tokens=decode_tokens, text_len=inputs.text, visual_len=inputs.visual,
                  **images)
    run_prefill = jax.jit(lambda m, i, k, p, config=config, common=common: pruning.prefill(
        m, config, i, k, pixel_values=p, **common))
    # Compiled once, ahead of time: the same executable gives the memory analysis and is the one timed.
    compiled = run_prefill.lower(model, ids, mask, pixels).compile()
    memory = compiled.memory_analysis()
    prefill_s, start, prefill_compiles = counter.timed(lambda: compiled(model, ids, mask, pixels), repeats)
    decode = lambda: pruning.decode(model, config, start, max_new_tokens=decode_tokens)
    decode_s, out, decode_compiles = counter.timed(decode, repeats)
    tokens = np.asarray(start.extra.tokens_per_layer).mean(axis=0)
    crops = (inputs.pixels.shape[1] if inputs.pixels.ndim == 5 else 1, model.config.vision.num_patches)
    select = selection_fn(config, b, inputs.visual, crops, (text.hidden_size, text.hidden_size), dtype)
    select_s, select_compiles = None, 0
    if select is not None:
      select_s, _, select_compiles = counter.timed(select, repeats)
    row = dict(impl="jax", part="pipeline", method=name, T=target, batch=b, device=device,
               prefill_ms=prefill_s * 1e3, decode_ms_per_token=decode_s * 1e3 / decode_tokens,
               selection_ms=None if select_s is None else select_s * 1e3,
               tokens_per_layer=[float(x) for x in tokens],
               prefill_flops=flops_lib.decoder_prefill_flops(text, tokens.tolist(), lm_head_positions=1),
               memory_bytes=_memory_bytes(memory), device_peak_bytes=_device_peak(),
               compiles=prefill_compiles + decode_compiles + select_compiles,
               generated=int(np.asarray(out.num_tokens).min()))
    if name == "full":
      full_prefill = row["prefill_ms"]
    row["speedup_vs_full"] = full_prefill / row["prefill_ms"] if full_prefill else None
    rows.append(row)
  return rows


def vision_flops(model, inputs: Inputs) -> float:
  """The vision row's FLOPs: the tower and projector (merger) on every image of the batch, as the architecture
  counts them (`experiments.analysis.flops`: LLaVA every crop slot up to the feature layer, without the CLS
  attention the row does not compute; Qwen2.5-VL every window and frame at its own size)."""
  config = model.config
  if inputs.grid is not None:
    return flops_lib.qwen_vision_flops(config.vision, inputs.grid).total
  crops = inputs.pixels.shape[0] * (inputs.pixels.shape[1] if inputs.pixels.ndim == 5 else 1)
  rows = config.vision.num_patches + (config.vision_feature_select_strategy == "full")
  return crops * (flops_lib.vision_flops(config, cls_attention=False) + flops_lib.projector_flops(config, rows))


def _memory_bytes(memory) -> int | None:
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
             - memory.alias_size_in_bytes)


def _device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def torch_rows(hf_cfg, backbone: backbones.Backbone, inputs: Inputs, targets: list[int | None], repeats: int,
               decode_tokens: int, dtype_name: str, seed: int, checkpoint: str | None) -> list[dict[str, Any]]:
  """transformers (sdpa) prefill/decode unpruned, and its decoder at text + target tokens for each of `targets`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")
  dtype = dict(float32=torch.float32, bfloat16=torch.bfloat16)[dtype_name]
  torch.manual_seed(seed)
  auto = transformers.AutoModelForImageTextToText
  if checkpoint:
    model = auto.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
  else:
    hf_cfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
      with dev:
        model = auto.from_config(hf_cfg)
    finally:
      torch.set_default_dtype(previous)
  model = model.to(dev).eval()
  sync = (lambda out: (torch.cuda.synchronize(), out)[1]) if cuda else (lambda out: out)
  b = inputs.ids.shape[0]
  ids = torch.tensor(inputs.ids, device=dev).long()      # int64, as tokenizers give them (Qwen's rope index needs it)
  mask = torch.tensor(inputs.mask, device=dev).long()
  pixels = torch.tensor(inputs.pixels, device=dev, dtype=dtype)
  extra = dict(image_sizes=torch.tensor(inputs.sizes, device=dev)) if backbone.pixel_crops else {}
  prompt_extra = {}
  if inputs.grid is not None:   # Qwen2.5-VL: the grids, and the token types its get_rope_index reads
    extra = dict(image_grid_thw=torch.tensor(inputs.grid, device=dev))
    prompt_extra = dict(mm_token_type_ids=torch.tensor(inputs.ids == model.config.image_token_id, device=dev).long())
  device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
  rows = []
  with torch.inference_mode():
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    prefill = lambda: model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True,
                            logits_to_keep=1, **extra, **prompt_extra)
    prefill_s, out = _median_time(prefill, repeats, sync)
    peak = torch.cuda.max_memory_allocated() if cuda else None

    # transformers >= 5.2x names the KV cache `cache` (argument and output); older releases `past_key_values`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode(cache):
      tok, m = out.logits[:, -1].argmax(-1), mask
      for i in range(decode_tokens):
        m = torch.cat([m, torch.ones((b, 1), dtype=m.dtype, device=dev)], dim=1)
        positions = {} if inputs.grid is None else dict(position_ids=torch_decode_positions(model, ids.shape[1], i))
        step = model(input_ids=tok[:, None], attention_mask=m, use_cache=True, **{name: cache}, **positions)
        cache, tok = getattr(step, name), step.logits[:, -1].argmax(-1)
      return tok

    # The cache grows in place: every call starts from an untimed copy of the prefill's.
    decode_s, _ = _median_time(decode, repeats, sync, setup=lambda: copy.deepcopy(getattr(out, name)))
    rows.append(dict(impl="torch", part="pipeline", method="full", T=None, batch=b, device=device,
                     prefill_ms=prefill_s * 1e3, decode_ms_per_token=decode_s * 1e3 / decode_tokens,
                     device_peak_bytes=peak))
    vision = lambda: model.model.get_image_features(pixel_values=pixels, **extra)
    vision_s, _ = _median_time(vision, repeats, sync)
    rows.append(dict(impl="torch", part="vision", batch=b, vision_ms=vision_s * 1e3, device=device))
    lm = model.model.language_model
    width = lm.config.hidden_size
    for target in sorted({t for t in targets if t is not None}):
      embeds = torch.randn((b, inputs.text + target, width), device=dev, dtype=dtype)
      decoder = lambda embeds=embeds: model.lm_head(lm(inputs_embeds=embeds, use_cache=True).last_hidden_state[:, -1:])
      dec_s, _ = _median_time(decoder, repeats, sync)
      rows.append(dict(impl="torch", part="decoder_at_T", method="one-shot", T=target, batch=b, device=device,
                       decoder_ms=dec_s * 1e3, prefill_ms=(dec_s + vision_s) * 1e3))
  return rows


def torch_decode_positions(model, prompt_len: int, step: int):
  """transformers' Qwen2.5-VL, decode step `step` after an unpadded prompt of `prompt_len` tokens: its M-RoPE ids
  long[3, B, 1] = prompt_len + step + the prefill's rope_deltas on the three components, as `generate` passes them
  (its forward, given none, derives one id per mask position, not per new token)."""
  deltas = model.model.rope_deltas.view(-1, 1)
  return (prompt_len + step + deltas)[None].expand(3, -1, 1)


def table(rows: list[dict[str, Any]]) -> str:
  """The markdown table of a run: one line per pipeline row, vision rows folded into a column, skipped methods
  listed under it with their reasons."""
  head = ["impl", "method", "T", "B", "vision ms", "selection ms", "prefill ms", "decode ms/token", "GFLOPs",
          "memory MB", "x full (jax)", "x full (torch)", "compiles"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)
  torch_full = {r["batch"]: r["prefill_ms"] for r in rows if r["impl"] == "torch" and r.get("method") == "full"}
  vision = {(r["impl"], r["batch"]): r["vision_ms"] for r in rows if r["part"] == "vision"}
  for r in rows:
    if r["part"] in ("vision", "skipped"):
      continue
    tf = torch_full.get(r["batch"])
    lines.append("| " + " | ".join([
        r["impl"], r["method"] + (" (decoder at T)" if r["part"] == "decoder_at_T" else ""), fmt(r["T"], "{}"),
        str(r["batch"]), fmt(vision.get((r["impl"], r["batch"]))), fmt(r.get("selection_ms")),
        fmt(r.get("prefill_ms")), fmt(r.get("decode_ms_per_token"), "{:.2f}"),
        fmt(None if r.get("prefill_flops") is None else r["prefill_flops"] / 1e9, "{:.3g}"),
        fmt(None if r.get("memory_bytes") is None else r["memory_bytes"] / 2**20, "{:.0f}"),
        fmt(r.get("speedup_vs_full"), "{:.2f}"),
        fmt(None if tf is None or r.get("prefill_ms") is None else tf / r["prefill_ms"], "{:.2f}"),
        fmt(r.get("compiles"), "{}")]) + " |")
  lines += [f"skipped: {r['method']} at T={r['T']}: {r['reason']}" for r in rows if r["part"] == "skipped"]
  return "\n".join(lines)


def run(shape_name: str, checkpoint: str | None, dtype_name: str, methods, targets, batch_sizes, repeats: int,
        decode_tokens: int, text_tokens: int, with_torch: bool, seed: int, attention: str = "auto",
        overrides=(), output: str | None = None) -> list[dict[str, Any]]:
  """The whole benchmark (see the module docstring); returns the rows."""
  dtype = jnp.dtype(dtype_name)
  if checkpoint:
    model = loading.load_pretrained(checkpoint, dtype=dtype)
    hf_cfg, image_size = None, (1008, 1008) if _patch_grids(model) else (672, 672)
  else:
    if shape_name not in shapes.SHAPES:
      raise ValueError(f"unknown --shape {shape_name!r}; known: {', '.join(shapes.SHAPES)}")
    shape = shapes.SHAPES[shape_name]
    hf_cfg = shapes.hf_config(shape)
    model = build_jax(hf_cfg.to_dict(), dtype, seed)
    image_size = shape.image_size
  model.language_model.attention_impl = attention
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  print(f"device: {device}; jax {jax.__version__}; shape {checkpoint or shape_name}; {dtype_name}")
  counter = CompileCounter()
  runs, skipped = _configs(model, methods, targets, plan.parse_overrides(overrides))
  rows = []

  def record(new_rows):   # written as measured: a run cut short (a device time limit) keeps what it measured
    rows.extend(new_rows)
    if output:
      with open(output, "a", encoding="utf-8") as f:
        for r in new_rows:
          f.write(json.dumps(dict(r, shape=checkpoint or shape_name, dtype=dtype_name,
                                  attention=attention if r["impl"] == "jax" else "sdpa")) + "\n")
    print(table(new_rows), flush=True)

  if skipped:
    record(skipped)
  for b in batch_sizes:
    inputs = make_inputs(model, b, image_size, text_tokens, seed)
    print(f"batch {b}: {inputs.ids.shape[1]} tokens per row ({inputs.visual} image tokens)", flush=True)
    record(jax_rows(model, inputs, runs, counter, repeats, decode_tokens, device, dtype))
    if with_torch:
      record(torch_rows(hf_cfg, backbones.of_model(model), inputs, [target for _, target, _ in runs], repeats,
                        decode_tokens, dtype_name, seed, checkpoint))
  print(table(rows))
  return rows


def _define_flags():
  """The command line, defined only when this module runs as a script: tests import it beside the runner, whose flags
  share names (--checkpoint, --output, ...), and the library functions take arguments."""
  flags.DEFINE_string("shape", "scaled-next", "Random-weight shape (models.shapes.SHAPES), unless --checkpoint.")
  flags.DEFINE_string("checkpoint", None, "A local llava-hf or Qwen2.5-VL checkpoint directory (overrides --shape).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
  flags.DEFINE_list("methods", ["tops", "visionzip", "divprune"], "Pruning methods (plus the full model).")
  flags.DEFINE_list("budgets", ["640"], "Targets (the papers' visual tokens per image).")
  flags.DEFINE_list("overrides", [], "method.name=value options of pruning.method_config, as the runner.")
  flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes.")
  flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median reported).")
  flags.DEFINE_integer("decode_tokens", 16, "Tokens generated for the per-token decode time.")
  flags.DEFINE_integer("text_tokens", 26, "Text tokens around the image (POPE's prompt is about 26).")
  flags.DEFINE_boolean("torch", True, "Time transformers (PyTorch, sdpa) beside it.")
  flags.DEFINE_string("attention", "auto", "Decoder attention schedule (models.attention).")
  flags.DEFINE_string("output", None, "JSONL file for the rows.")
  flags.DEFINE_boolean("smoke", False, "Tiny shape, one repeat, two decode tokens (for the tests): tiny-next, or "
                       "--shape=tiny-qwen.")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.smoke:
    smoke(shape=f.shape if f.shape in SMOKE else "tiny-next")
    return
  run(f.shape, f.checkpoint, f.dtype, f.methods, [int(target) for target in f.budgets], [int(b) for b in f.batch_sizes],
      f.repeats, f.decode_tokens, f.text_tokens, f.torch, f.seed, f.attention, f.overrides, f.output)


# Smoke settings per tiny shape: (methods, target). The targets have no paper Stage II setting: TOPS takes the
# overrides below. tiny-next: 88 packed tokens per image; tiny-qwen: 35 merged tokens per image.
SMOKE = {"tiny-next": (["tops", "visionzip", "divprune"], 40), "tiny-qwen": (["tops", "divprune"], 8)}


def smoke(output: str | None = None, with_torch: bool = True, shape: str = "tiny-next") -> list[dict[str, Any]]:
  """Tiny shape (`SMOKE`), one repeat, two decode tokens, batch 2."""
  methods, target = SMOKE[shape]
  return run(shape, None, "float32", methods, [target], [2], 1, 2, 26, with_torch, 0,
             overrides=["tops.stage2_alpha=0.5", "tops.stage2_lam=0.5"], output=output)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
