"""The pruned forward and generation: host checks and static lengths (`prepare`), the prefill that runs Stage I, the
decoder segments and the Stage II steps (`prefill`), and the jitted entry points `forward` and `greedy`.

Generation is this module's cached prefill (a `models.generate.Prefill`) decoded by `models.generate.decode` over
the config's layer segments (generate never calls back here). Every jitted program takes the config as a
`StaticConfig` (structure) plus its float hyperparameters as traced arguments, so configs that differ only in those
share one compile.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import checks
from models import generate
from models import llama
from models.pruning import methods
from models.pruning import sequence
from models.pruning import stage1 as stage1_lib
from models.pruning import stage2 as stage2_lib
from models.pruning.config import PruningConfig, StaticConfig
from models.pruning.outputs import PrunedGeneration, PruneOutput, Segment

__all__ = ["forward", "greedy", "prefill", "prefill_program", "decode_step", "prepare"]


def _run(model, seq: sequence.Seq, start: int, stop: int, cache):
  if start == stop:
    return seq, cache
  # A prefill runs each layer once, so its layers' caches are still empty (causal attention skips hidden blocks).
  out = model.language_model.run_layers(seq.hidden, seq.positions, seq.mask, start=start, stop=stop, cache=cache,
                                        cache_empty=True)
  return seq._replace(hidden=out.hidden), out.cache


def _segment(seq: sequence.Seq, index) -> Segment:
  return Segment(index=index, source=seq.source, positions=seq.positions, mask=seq.mask, visual=seq.visual)


def _prefill(model, static: StaticConfig, plan: sequence.Plan, batch: dict, args, cache,
             all_logits: bool) -> PruneOutput:
  """Stage I -> decoder segments with the Stage II steps between them -> logits. args = (key | None, traced)."""
  config = static.config
  key, traced = args
  ids = batch["input_ids"]
  mask = batch["attention_mask"].astype(bool)
  left = ~jnp.any(~mask[:, -1])
  num_layers = model.config.text.num_hidden_layers
  image_id = model.config.image_token_id
  keys = [None] * (len(config.steps) + 1) if key is None else [jax.random.fold_in(key, i)
                                                                  for i in range(len(config.steps) + 1)]
  stage1 = config.stage1_budget is not None
  images = stage1_lib.visual_tokens(model, config, batch["pixel_values"], batch["layout"], stage1)
  image_rows = batch["image_rows"]
  if stage1:
    seq, stage1_out = stage1_lib.run(model, config, plan, ids, mask, images, image_rows, batch.get("clip"), keys[0],
                                     left, static.hparams("stage1", traced), layout=batch["layout"])
    candidates = plan.row_slots
  else:
    is_image = (ids == image_id) & mask
    ordinal, within = sequence.image_slots(is_image, image_rows.row_images,
                                           jnp.sum(images.valid, axis=-1, dtype=jnp.int32))
    # The model's merge (`model.embed`) row by row: under a mesh each row reads only its own images.
    hidden = sequence.place_images(model.language_model.embed(ids), is_image, image_rows.of_rows(images.embeds),
                                   ordinal, within)
    seq = sequence.Seq(hidden=hidden,
                       positions=model.positions(ids, mask, batch["layout"]), mask=mask, visual=is_image,
                       source=jnp.where(mask, jnp.arange(ids.shape[1]), -1),
                       packed=jnp.where(is_image, ordinal * images.embeds.shape[1] + within, -1))
    stage1_out, candidates = None, plan.visual
  inputs_embeds = seq.hidden
  hp2 = static.hparams("stage2", traced)
  raters = None
  if config.stage2 and config.stage2_relevance == "raters" and config.stage2_raters == "sparsevlm":
    raters = stage2_lib.sparsevlm_raters(plan, seq, candidates, ids.shape[1])     # once, from the LLM input
  num_visual, most = jnp.sum(seq.visual & seq.mask, axis=-1, dtype=jnp.int32), candidates
  num_images = jnp.sum(image_rows.row_images >= 0, axis=-1, dtype=jnp.int32)
  bounds = _step_bounds(config, plan, candidates)
  segments, stages, done, index = [], [], 0, seq.source
  for step, ((layer, _), bound) in enumerate(zip(config.steps, bounds)):
    segments.append(_segment(seq, index))
    scoring, cut = config.score_layer(layer), config.prune_layer(layer)
    seq, cache = _run(model, seq, done, scoring, cache)
    scores = stage2_lib.score(model, config, plan, seq, scoring, candidates, raters)
    seq, cache = _run(model, seq, scoring, cut, cache)
    count = None
    if config.stage2_ratios is not None:
      count = stage2_lib.ratio_counts(config.stage2_ratios[step], num_visual, most)
    elif plan.images > 1:         # a step's keep is per image: a row keeps it for each of its images
      count = config.steps[step][1] * num_images
    choice = stage2_lib.choose(model, config, seq, bound, scores, keys[step + 1], hp2, count, step)
    seq, index, stage = stage2_lib.rebuild(config, plan, seq, bound.keep, scores, choice, left)
    stages.append(stage)
    done, candidates = cut, bound.keep + (0 if choice.extra is None else choice.extra.shape[1])
  segments.append(_segment(seq, index))
  seq, cache = _run(model, seq, done, num_layers, cache)

  hidden = seq.hidden if all_logits else sequence.take(seq.hidden, sequence.last_real(seq.mask)[:, None])
  bounds = config.segments(num_layers)
  per_layer = lambda flag: jnp.stack([jnp.sum(flag(s), axis=-1, dtype=jnp.int32)
                                      for s, (a, b) in zip(segments, bounds) for _ in range(a, b)], axis=-1)
  # Decoding continues after the largest component of the last token's position (text: all components agree).
  last = jnp.stack([jnp.max(sequence.take_positions(s.positions, sequence.last_real(s.mask)[:, None])[..., 0],
                            axis=0) for s in segments], axis=-1)
  return PruneOutput(logits=model.head(hidden), stage1=stage1_out, stage2=tuple(stages), segments=tuple(segments),
                     inputs_embeds=inputs_embeds, tokens_per_layer=per_layer(lambda s: s.mask),
                     visual_per_layer=per_layer(lambda s: s.visual & s.mask), last_positions=last.astype(jnp.int32),
                     cache=cache)


@functools.partial(jax.jit, static_argnames=("static", "plan", "all_logits"))
def _forward(model, batch, args, *, static, plan, all_logits):
  return _prefill(model, static, plan, batch, args, None, all_logits)


@functools.partial(jax.jit, static_argnames=("static", "plan", "capacity", "cache_dtype"))
def _prefill_cached(model, batch, args, *, static, plan, capacity: int, cache_dtype) -> generate.Prefill:
  """The pruned prefill into an empty cache of `capacity` slots: where `models.generate.decode` starts (`extra`:
  the PruneOutput without its cache)."""
  cache = llama.init_cache(model.config.text, batch["input_ids"].shape[0], capacity, cache_dtype)
  out = _prefill(model, static, plan, batch, args, cache, all_logits=False)
  return generate.Prefill(logits=out.logits[:, 0], cache=out.cache, positions=out.last_positions,
                          extra=out._replace(cache=None))


def _step_bounds(config: PruningConfig, plan: sequence.Plan, first: int):
  """The static sizes of the Stage II steps for a first step of `first` candidates: a step's keep is per image, so
  rows of up to J images hold J times each step's keep."""
  bounds = stage2_lib.step_bounds(config, first, plan.text_len)
  return tuple(b._replace(keep=b.keep * plan.images) for b in bounds) if plan.images > 1 else bounds


def _image_rows(images_per_row, num_images: int, b: int, ids, mask, counts, image_id: int) -> sequence.ImageRows:
  """Which images each row holds (host): given, one per row (I = B), or read from concrete <image> counts."""
  if images_per_row is not None:
    per_row = np.asarray(images_per_row)
    if per_row.shape != (b,) or not np.issubdtype(per_row.dtype, np.integer) or np.any(per_row < 0):
      raise ValueError(f"images_per_row must be B={b} non-negative ints, got {images_per_row!r}")
    if per_row.sum() != num_images:
      raise ValueError(f"images_per_row sums to {int(per_row.sum())} images, pixel_values holds {num_images}")
    return sequence.ImageRows.from_counts(per_row)
  if num_images == b:
    return sequence.ImageRows.from_counts(np.ones(b, np.int64))
  if ids is None or counts is None:
    raise ValueError(f"{num_images} images for {b} rows: pass images_per_row (int[B]) when input_ids or the image "
                     "sizes are traced")
  tokens = np.sum((ids == image_id) & mask, axis=-1)
  per_row, image = np.zeros(b, np.int64), 0
  for row in range(b):      # each row takes the next images until their <image> tokens are the row's
    need = int(tokens[row])
    while need > 0 and image < num_images and counts[image] <= need:
      need -= int(counts[image])
      per_row[row] += 1
      image += 1
    if need:
      raise ValueError(f"row {row} holds {int(tokens[row])} image tokens, which no run of the next images fills "
                       f"(image {image} brings {int(counts[min(image, num_images - 1)])}); pass images_per_row")
  if image != num_images:
    raise ValueError(f"the rows' image tokens fill {image} of the {num_images} images in pixel_values")
  return sequence.ImageRows.from_counts(per_row)


def _bound_layout(model, layout, image_sizes, b: int):
  """The packing layout for the batch: given, from concrete image sizes (numpy) or traced ones (callback)."""
  if layout is not None:
    return layout
  return model.layout(np.asarray(image_sizes) if sequence.concrete(image_sizes) else image_sizes, b)


def _check_clip(config: PruningConfig, clip, b: int):
  if config.stage1_relevance != "clip_text":
    return
  if clip is None:
    raise ValueError(f"{config.method} with stage1_relevance='clip_text' needs `clip` (stage1.ClipText: the CLIP "
                     "checkpoint's image head and each row's text embedding; the runner's --clip_checkpoint)")
  if not isinstance(clip, stage1_lib.ClipText):
    raise ValueError(f"clip must be a stage1.ClipText, got {type(clip).__name__}")
  if np.ndim(clip.text_embeds) != 2 or np.shape(clip.text_embeds)[0] != b:
    raise ValueError(f"clip.text_embeds must be float[B={b}, E], got shape {np.shape(clip.text_embeds)}")


def _layout_input(image_sizes, image_grid_thw, mm_token_type_ids, input_ids, image_id):
  """The array the family's `layout` reads: LLaVA-NeXT's image_sizes or Qwen2.5-VL's image_grid_thw (one of them).
  The processor's mm_token_type_ids are not an input of the pruned forward (the image tokens say the same): checked
  against input_ids when concrete."""
  if image_sizes is not None and image_grid_thw is not None:
    raise ValueError("pass image_sizes (LLaVA-NeXT) or image_grid_thw (Qwen2.5-VL), not both")
  if mm_token_type_ids is not None and sequence.concrete(mm_token_type_ids) and sequence.concrete(input_ids):
    types = np.asarray(mm_token_type_ids)
    if types.shape != np.shape(input_ids) or np.any((types == 1) != (np.asarray(input_ids) == image_id)) \
        or np.any(types == 2):
      raise ValueError("mm_token_type_ids must mark exactly the image tokens of input_ids (1) and no video (2): the "
                       "pruned forward reads the image tokens from input_ids")
  return image_grid_thw if image_grid_thw is not None else image_sizes


def prepare(model, config: PruningConfig, input_ids, attention_mask, pixel_values, image_sizes, layout,
            text_len, visual_len=None, clip=None, images_per_row=None, image_grid_thw=None,
            mm_token_type_ids=None) -> tuple[dict, sequence.Plan]:
  """Host-side checks and the static plan; -> (batch of arrays, plan)."""
  image_sizes = _layout_input(image_sizes, image_grid_thw, mm_token_type_ids, input_ids, model.config.image_token_id)
  config.check_model(model)
  if pixel_values is None:
    raise ValueError("pruning needs pixel_values: the images of the rows")
  checks.check_input_ids(input_ids, model.config.text.vocab_size)
  checks.check_pixel_values(pixel_values)
  ids = jnp.asarray(input_ids)
  b, s = ids.shape
  mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != (b, s):
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(b, s)}")
  # Qwen2.5-VL's pixel_values are the batch's patches, float[Np, E]: its images are the grids' rows.
  num_images = np.shape(image_grid_thw)[0] if image_grid_thw is not None else np.shape(pixel_values)[0]
  layout = _bound_layout(model, layout, image_sizes, num_images)
  image_id = model.config.image_token_id
  counts = np.asarray(layout.counts) if sequence.concrete(layout.counts) else None
  concrete_ids = sequence.concrete(input_ids) and (attention_mask is None or sequence.concrete(attention_mask))
  image_rows = _image_rows(images_per_row, num_images, b, np.asarray(ids) if concrete_ids else None,
                           np.asarray(mask) if concrete_ids else None, counts, image_id)
  m = image_rows.row_images.shape[1]
  if m > 1 and config.stage2:
    spec = methods.get(config.method2)
    if spec.stage2_bounds is not None or spec.stage2_choose is not None:
      raise ValueError(f"{config.method2}'s own Stage II step takes one image per row (its official code prunes "
                       f"one image); this batch has rows of {m} images")
  batch = dict(input_ids=ids, attention_mask=mask, pixel_values=jnp.asarray(pixel_values), layout=layout,
               image_rows=sequence.ImageRows(*(jnp.asarray(a) for a in image_rows)))
  visual = int(counts.max()) if counts is not None else np.shape(layout.valid)[1]     # per image
  row_visual = visual * m
  if counts is not None:
    row_visual = int(np.where(image_rows.row_images >= 0, counts[np.maximum(image_rows.row_images, 0)], 0)
                     .sum(-1).max())
  newlines = 0
  if config.stage1_budget is not None and config.newlines in ("rows", "keep"):
    if visual_len is not None:     # fixed shapes were asked for: the static bound, not this batch's count
      newlines = model.config.max_newlines
    elif sequence.concrete(layout.newline):
      newlines = int(np.asarray(layout.newline).sum(-1).max())
    else:
      newlines = model.config.max_newlines
  rows = 0
  if config.stage1_budget is not None:
    num_crops = np.shape(pixel_values)[1] if np.ndim(pixel_values) == 5 else 1
    rows = stage1_lib.capacity(config, model.config, visual=visual, newlines=newlines, num_crops=num_crops)
    _check_clip(config, clip, b)
  if counts is not None:
    real = counts - np.asarray(layout.newline).sum(-1)
    if config.stage1_grid == "padded" and sequence.concrete(layout.grid):
      grid = np.asarray(layout.grid)
      crops = 1 + grid[:, 0] * grid[:, 1]
      quota = (config.stage1_budget // stage1_lib.nominal_crops(config, model.config)
               if config.stage1_scope == "crop_fixed" else config.stage1_budget // crops)
      need = quota * crops
      if np.any(need > counts):
        i = int(np.argmax(need > counts))
        raise ValueError(f"image {i} has {int(counts[i])} <image> tokens, fewer than the {int(need[i])} rows its "
                         f"{config.stage1_scope} layout hands to the LLM")
    if config.stage1_scope in ("global", "per_crop") and config.stage1_budget is not None \
        and config.stage1_budget > real.min():
      raise ValueError(f"stage1_budget={config.stage1_budget} exceeds the {int(real.min())} image tokens of "
                       f"image {int(real.argmin())} (newlines excluded)")
    available = counts
    if config.stage1_budget is not None:
      available = config.stage1_budget + np.asarray(layout.newline).sum(-1) * (config.newlines == "keep")
    if config.stage2 and not config.stage2_counts_vary and config.steps[0][1] > available.min():
      raise ValueError(f"stage2 keeps {config.steps[0][1]} tokens, more than the {int(available.min())} image "
                       f"tokens image {int(available.argmin())} brings to the LLM")
  if concrete_ids:
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    _check_image_runs((ids_np == image_id) & mask_np, image_rows, counts)
    actual = sequence.text_length(ids_np, mask_np, image_id)
    if text_len is not None and text_len < actual:
      raise ValueError(f"text_len={text_len} is smaller than the {actual} text tokens of the longest row")
    text_len = actual if text_len is None else int(text_len)
  elif text_len is None:
    text_len = s - m * model.config.vision.num_patches    # every image holds at least one crop of tokens
  if visual_len is not None:
    if int(visual_len) < visual:
      raise ValueError(f"visual_len={visual_len} is smaller than the {visual} image tokens of the longest image")
    visual, row_visual = int(visual_len), int(visual_len) * m
  if clip is not None:
    batch["clip"] = clip
  return batch, sequence.Plan(text_len=int(text_len), visual=int(row_visual), newlines=int(newlines), rows=int(rows),
                              images=int(m))


def _check_image_runs(image: np.ndarray, image_rows: sequence.ImageRows, counts):
  """Each row holds its images' <image> tokens, each image's as one contiguous run (host numpy)."""
  for row in range(image.shape[0]):
    where = np.flatnonzero(image[row])
    own = [int(i) for i in image_rows.row_images[row] if i >= 0]
    if counts is None:           # traced image sizes: one image's run can still be checked
      if len(own) == 1 and len(where) and where[-1] - where[0] + 1 != len(where):
        raise ValueError(f"row {row}: the image tokens of image {own[0]} are not one contiguous run")
      continue
    need = int(sum(counts[i] for i in own))
    if len(where) != need:
      raise ValueError(f"row {row} holds {len(where)} image tokens, its images ({', '.join(map(str, own)) or 'none'})"
                       f" have {need}")
    start = 0
    for i in own:
      run = where[start:start + int(counts[i])]
      if len(run) and run[-1] - run[0] + 1 != len(run):
        raise ValueError(f"row {row}: the image tokens of image {i} are not one contiguous run")
      start += int(counts[i])


def _args(config: PruningConfig, key) -> tuple[Any, dict]:
  return key, config.traced_hparams()


def forward(model, config: PruningConfig, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, *,
            layout=None, key=None, text_len: int | None = None, visual_len: int | None = None,
            all_logits: bool = False, cache_capacity: int | None = None, cache_dtype=None,
            clip: "stage1_lib.ClipText | None" = None, images_per_row=None, image_grid_thw=None,
            mm_token_type_ids=None) -> PruneOutput:
  """The pruned forward of a LLaVA / LLaVA-NeXT port (jitted per config structure and static lengths).

  Args:
    model: a `models.family.VisionLanguageModel` (any family of `models.backbones`).
    config: the PruningConfig.
    input_ids: int[B, S] with one contiguous <image> run per image (the processor's expansion), a row's images in
      the order of pixel_values.
    attention_mask: bool/int[B, S] (left or right padding); None = all real.
    pixel_values: float[I, 3, H, W] (LLaVA-1.5) or float[I, P, 3, H, W] (NeXT): the images of the rows in order.
    image_sizes: int[I, 2] (NeXT) unless `layout` (`model.layout(image_sizes, I)`) is given; LLaVA-1.5 reads none.
    image_grid_thw: int[I, 3] (Qwen2.5-VL, whose pixel_values are the batch's patches float[Np, E]) in place of
      image_sizes; mm_token_type_ids: the processor's, checked against the image tokens (no videos).
    key: PRNG key for random methods (folded with the stage index).
    text_len: static bound on real non-image tokens per row (default: read from concrete inputs).
    visual_len: static bound on image tokens per image (default: read from concrete inputs). Fixing `text_len` and
      `visual_len` across batches (e.g. to `model.config.max_image_tokens`) lets one compiled program serve them all.
    all_logits: logits over the whole last segment, float32[B, S_G, V]; by default only at each row's last real
      token, float32[B, 1, V] (the LM head then runs on B rows).
    cache_capacity: when given, a KV cache of that many slots is filled (the pruned prefill `greedy` decodes from);
      it must hold the longest segment plus the tokens to decode. Implies last logits.
    cache_dtype: the cache's dtype (default the model's).
    clip: `stage1.ClipText` for stage1_relevance="clip_text" (CDPruner): the CLIP image head and each row's CLIP
      text embedding.
    images_per_row: int[B] images in each row (host ints). Default: one per row when I = B, otherwise read from the
      concrete <image> counts. Budgets are per image: Stage I selects each image on its own (with its row's text)
      and a Stage II step keeps its count for each image of the row, over all of the row's image tokens.

  Returns:
    PruneOutput (see its docstring).

  Raises:
    ValueError: a schedule that does not fit the model or the batch, an empty batch, image-token counts that do not
      match the images, and (concrete arrays) token ids outside the vocabulary or NaN/inf pixel_values.
  """
  batch, plan = prepare(model, config, input_ids, attention_mask, pixel_values, image_sizes, layout, text_len,
                        visual_len, clip, images_per_row, image_grid_thw, mm_token_type_ids)
  if cache_capacity is None:
    return _forward(model, batch, _args(config, key), static=config.static(), plan=plan, all_logits=all_logits)
  if all_logits:
    raise ValueError("all_logits and cache_capacity are exclusive (a prefill returns the last logits)")
  start = _prefill_cached(model, batch, _args(config, key), static=config.static(), plan=plan,
                          capacity=int(cache_capacity),
                          cache_dtype=jnp.dtype(cache_dtype or model.language_model.dtype))
  return start.extra._replace(cache=start.cache)


def _prompt_len(config: PruningConfig, plan: sequence.Plan, mask) -> int:
  """The most positions a row's prompt takes after the pruned prefill (decoding continues after them): Stage I
  re-indexes from 0 over at most text_len + budget (+ newlines) tokens, Stage II only shortens; without Stage I the
  longest real row (the padded length when the mask is traced)."""
  if config.stage1_budget is not None:
    return plan.text_len + plan.row_slots
  if checks.is_concrete(mask):
    return int(np.asarray(mask).sum(axis=-1).max())
  return mask.shape[1]


def cache_capacity(config: PruningConfig, plan: sequence.Plan, seq_len: int, max_new_tokens: int) -> int:
  """Slots the pruned prefill's longest layer segment needs, plus the tokens to decode."""
  first = plan.visual if config.stage1_budget is None else plan.row_slots
  longest = max([seq_len if config.stage1_budget is None else plan.text_len + plan.row_slots]
                + [plan.text_len + b.keep + b.extra for b in _step_bounds(config, plan, first)])
  return longest + max_new_tokens


def prefill_program(model, config: PruningConfig, input_ids, attention_mask=None, *, pixel_values, image_sizes=None,
                    layout=None, max_new_tokens: int, key=None, text_len: int | None = None,
                    visual_len: int | None = None, cache_dtype=None, clip=None, images_per_row=None,
                    image_grid_thw=None, mm_token_type_ids=None):
  """The program `prefill` runs and what it passes: (jitted function, arguments (model, batch, (key, traced
  hyperparameters)), static keyword arguments); `fn(*args, **static)` is `prefill`. A caller that compiles it for
  another target (`experiments.tpu_compile`) swaps the arrays of `args` for abstract ones and keeps the rest."""
  batch, plan = prepare(model, config, input_ids, attention_mask, pixel_values, image_sizes, layout, text_len,
                        visual_len, clip, images_per_row, image_grid_thw, mm_token_type_ids)
  max_new_tokens = checks.check_max_new_tokens(max_new_tokens, _prompt_len(config, plan, batch["attention_mask"]),
                                               model.config.text.max_position_embeddings)
  static = dict(static=config.static(), plan=plan,
                capacity=cache_capacity(config, plan, batch["input_ids"].shape[1], max_new_tokens),
                cache_dtype=jnp.dtype(cache_dtype or model.language_model.dtype))
  return _prefill_cached, (model, batch, _args(config, key)), static


def prefill(model, config: PruningConfig, input_ids, attention_mask=None, *, pixel_values, image_sizes=None,
            layout=None, max_new_tokens: int, key=None, text_len: int | None = None, visual_len: int | None = None,
            cache_dtype=None, clip=None, images_per_row=None, image_grid_thw=None,
            mm_token_type_ids=None) -> generate.Prefill:
  """The pruned prefill as `models.generate.decode` starts from it (`extra`: the PruneOutput without its cache);
  arguments as `greedy`. Time this call and decode its result to measure exactly the work that is scored."""
  fn, args, static = prefill_program(model, config, input_ids, attention_mask, pixel_values=pixel_values,
                                     image_sizes=image_sizes, layout=layout, max_new_tokens=max_new_tokens, key=key,
                                     text_len=text_len, visual_len=visual_len, cache_dtype=cache_dtype, clip=clip,
                                     images_per_row=images_per_row, image_grid_thw=image_grid_thw,
                                     mm_token_type_ids=mm_token_type_ids)
  return fn(*args, **static)


def greedy(model, config: PruningConfig, input_ids, attention_mask=None, *, pixel_values, image_sizes=None,
           layout=None, max_new_tokens: int, eos_token_ids=(), pad_token_id: int = 0, key=None,
           text_len: int | None = None, visual_len: int | None = None, cache_dtype=None,
           clip=None, images_per_row=None, image_grid_thw=None, mm_token_type_ids=None) -> PrunedGeneration:
  """Greedy decoding with the pruned prefill (`models.generate.greedy` semantics: tokens after a row's stop token
  are `pad_token_id`; the loop stops when every row has stopped). Arguments as `forward`, plus max_new_tokens M (a
  positive int; the pruned prompt plus M must fit max_position_embeddings), eos_token_ids, pad_token_id and
  cache_dtype (default the model's dtype). `prefill` then `models.generate.decode` over the config's segments."""
  start = prefill(model, config, input_ids, attention_mask, pixel_values=pixel_values, image_sizes=image_sizes,
                  layout=layout, max_new_tokens=max_new_tokens, key=key, text_len=text_len, visual_len=visual_len,
                  cache_dtype=cache_dtype, clip=clip, images_per_row=images_per_row, image_grid_thw=image_grid_thw,
                  mm_token_type_ids=mm_token_type_ids)
  out = decode(model, config, start, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
               pad_token_id=pad_token_id)
  return PrunedGeneration(tokens=out.tokens, num_tokens=out.num_tokens, prefill=start.extra)


def decode(model, config: PruningConfig, start: generate.Prefill, *, max_new_tokens: int, eos_token_ids=(),
           pad_token_id: int = 0) -> generate.GenerateOutput:
  """`models.generate.decode` over the config's layer segments, from a pruned `prefill`."""
  return generate.decode(model, start._replace(extra=None),
                         segments=config.segments(model.config.text.num_hidden_layers),
                         max_new_tokens=int(max_new_tokens), eos_token_ids=generate.stop_tokens(eos_token_ids),
                         pad_token_id=int(pad_token_id))


def decode_step(model, config: PruningConfig, cache: llama.KVCache, tokens: jax.Array, positions: jax.Array):
  """One token per row through the G layer segments: tokens int[B], positions int32[B, G] (segment g's position of
  the token) -> (logits float32[B, V], cache)."""
  return generate.decode_step(model, cache, tokens, positions,
                              config.segments(model.config.text.num_hidden_layers))
