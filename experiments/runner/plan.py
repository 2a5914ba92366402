"""What a runner invocation evaluates: the typed run configuration (built once from the flags), the backbones, each
method's pruning configuration, and the runs (method x target) they resolve to.

    config = plan.RunConfig.from_flags(flags.FLAGS)      # frozen; every flag the runner reads, checked
    resolved, runs = plan.resolve(config, model)          # targets, defaults and fingerprints filled in; RunSpecs

Targets (the count vocabulary: `models`). `--budget` gives the targets (the papers' visual tokens per image)
directly; `--keep_ratio` gives target = round(ratio * N_ref) with N_ref the model's nominal visual-token count
(`models.backbones.Backbone.nominal_tokens`: LLaVA-1.5 576; LLaVA-NeXT 2880 = 5 crops x 576, so the ratios give the
papers' 640/320/160; testbed: 5 crops x 36 = 180; Qwen2.5-VL 1,296). With neither flag, a backbone with default
budgets takes them (Qwen2.5-VL: the TOPS paper's 256 / 128), the others the ratios. How a family's examples become
inputs (processor, images, arrays, token-count buckets) is its `Backbone.inputs` (`experiments.runner.inputs`), under
the invocation's `--min_pixels` / `--max_pixels` (`backbone_of`: Qwen2.5-VL only).

What each method does with a target is its official protocol, `models.pruning.method_config` (the table in
`models/pruning/protocols.py`: CDPruner target // 5 per crop with CLIP text relevance, DivPrune
round(target / 2880 x length) over the packed sequence with newlines, SCOPE int(target / crops) per padded crop,
VisionZip [CLS, dominant, contextual] per crop, DART 4 + 8 floor(target / 8) at layer 2, FastV the target at layer 2,
TOPS the paper's schedule). `--overrides` (method.name=value, each value read as its override's kind; sequences and
dicts join their items with "+": pdrop.layers=2+8+16, tops.criteria=relevance+diversity, tops.hparams=engine:dense)
selects the named variants; `--alpha/--lam` override TOPS Stage I, `--stage2_alpha/--stage2_lam` Stage II (a flag
and an override of the same setting are an error). CDPruner needs `--clip_checkpoint` (CLIP's text tower) except on
the testbed, whose tower is not a CLIP checkpoint's: there, or with `--overrides=cdpruner.relevance=text`, it runs
the documented fallback relevance and its rows are labelled "cdpruner-text"; without either, `--method=all` lists
its runs among the skipped ones.
"""

import dataclasses
import itertools
import json
import os
from typing import Any, Callable

from experiments.runner import inputs as inputs_lib
from experiments.runner.fingerprints import fingerprint
from models import backbones
from models import pruning
from tops_jax import prune
from tops_jax import tops as tops_lib

__all__ = ["RATIOS", "Backbone", "BACKBONES", "TopsOptions", "RunConfig", "RunSpec", "Resolved", "MethodContext",
           "RUNNABLE", "method_config", "parse_overrides", "cdpruner_fallback", "FULL", "resolve", "IN_MEMORY_TASKS",
           "RESOLUTIONS", "task_names", "run_hash_fields", "reads_clip", "backbone_of"]

# The papers' kept fractions, exactly: 2/9, 1/9 and 1/18 of the nominal tokens (77.8 / 88.9 / 94.4% pruned), so the
# default targets are theirs: 128 / 64 / 32 of LLaVA-1.5's 576, 640 / 320 / 160 of LLaVA-NeXT's 2880 (the rounded
# 0.222 would give 639) and 40 / 20 / 10 of the testbed's 180.
RATIOS = (2 / 9, 1 / 9, 1 / 18)
IN_MEMORY_TASKS = ("synthvqa", "vqa_jsonl")     # experiments.runner.tasks; the benchmarks are experiments.benchmarks
RESOLUTIONS = ("native", "fixed_672")

@dataclasses.dataclass(frozen=True)
class Backbone:
  """A --backbone choice: a model family of `models.backbones` and how the runner uses it. Its nominal tokens and
  crops (N_ref of --keep_ratio, a quota of target // crops per crop) are read from the loaded model's config
  (`backbones.Backbone.nominal_tokens` / `nominal_groups`)."""
  model_type: str             # the `models.backbones` family: config.json model_type of its checkpoints
  family: str                 # the name its methods' protocols know it by (`pruning.method_config(family=)`)
  max_new_tokens: int
  prompt: str                 # with {question}; "<image>" where the image goes
  protocol: str | None = None  # default benchmark protocol: what produced the papers' tables
  square_pad: bool = False    # LLaVA-1.5: pad-to-square unless the task keeps the original aspect
  inputs: Any = inputs_lib.LLAVA  # the family's input hooks (`experiments.runner.inputs`: processor, images, arrays)
  budgets: tuple[int, ...] = ()   # default targets (the papers'); () = the default --keep_ratio values
  conv_template: str | None = None  # default benchmark template; None: the checkpoint's decoder decides
  in_memory: bool = True      # runs the in-memory tasks (their prompt, one image size, kept-token pictures)
  resolutions: tuple[str, ...] = RESOLUTIONS   # the --resolution values it takes


def _family(model_type: str) -> Backbone:
  """A family's preset: everything from its registry entry."""
  b = backbones.get(model_type)
  return Backbone(model_type=b.name, family=b.name, max_new_tokens=b.max_new_tokens, prompt=b.prompt,
                  protocol=b.protocol, square_pad=b.square_pad)


def _backbones() -> dict[str, Backbone]:
  from experiments import testbed  # pylint: disable=g-import-not-at-top  (the model face only: no training code)
  # The testbed is a small LLaVA-NeXT with its own prompt and one-token answers, no paper settings and no benchmark
  # protocol (its methods' protocols know it as "testbed").
  return {
      "testbed": Backbone(model_type="llava_next", family="testbed", max_new_tokens=1, prompt=testbed.PROMPT),
      "llava_1_5": _family("llava"),
      "llava_next": _family("llava_next"),
      # Qwen2.5-VL on lmms-eval's qwen2_5_vl wrapper (`inputs.QwenInputs`): the checkpoint's chat template with the
      # wrapper's system message, T = 256 / 128 (the TOPS paper's Table 2), images at their native size.
      "qwen2_5_vl": dataclasses.replace(_family("qwen2_5_vl"), inputs=inputs_lib.QWEN2_5_VL, budgets=(256, 128),
                                        conv_template="chat_template", in_memory=False, resolutions=("native",)),
  }


BACKBONES = _backbones()


def backbone_of(run: "RunConfig") -> Backbone:
  """The --backbone preset with its input hooks under the run's --min_pixels / --max_pixels (a new Backbone: the
  presets stay as they are). ValueError naming the flag for a backbone whose inputs take no pixel bounds or a
  bound that is not a positive integer (`inputs.QwenInputs`)."""
  backbone = BACKBONES[run.backbone]
  return dataclasses.replace(backbone, inputs=backbone.inputs.configure(run.backbone, run.min_pixels, run.max_pixels))


@dataclasses.dataclass(frozen=True)
class TopsOptions:
  """The flags that only affect tops (None: the paper's value)."""
  alpha: float | None = None
  lam: float | None = None
  stage2_alpha: float | None = None
  stage2_lam: float | None = None
  normalize: str | None = None

  def given(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

  def as_overrides(self) -> dict[str, tuple[str, Any]]:
    """The given flags as the tops overrides they set: {override name: (flag, value)}."""
    return {_TOPS_OVERRIDES.get(name, name): (name, getattr(self, name)) for name in self.given()}


_TOPS_OVERRIDES = {"alpha": "stage1_alpha", "lam": "stage1_lam"}   # the flags named otherwise than their override


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every setting of a runner invocation, as the flags gave them (`from_flags`); `resolve` checks and completes it."""
  backbone: str = "testbed"
  checkpoint: str | None = None
  methods: tuple[str, ...] = ("all",)
  budgets: tuple[str, ...] = ()       # --budget: the targets, as given
  keep_ratios: tuple[str, ...] = ()
  tasks: tuple[str, ...] = ("synthvqa",)
  data_dir: str | None = None
  split: str = "test"
  limit: int = 400
  batch_size: int = 25
  output_dir: str | None = None
  seed: int = 0
  tops: TopsOptions = TopsOptions()
  ablation: bool = False
  max_new_tokens: int | None = None
  pictures: int = 3
  protocol: str | None = None         # benchmarks: "llava" | "lmms_eval" (None: the backbone's)
  conv_template: str | None = None    # benchmarks: experiments.runner.conversation template (None: the checkpoint's)
  resolution: str = "native"          # LLaVA-NeXT benchmark images: "native" | "fixed_672"
  overrides: tuple[str, ...] = ()     # "method.name=value": named variants of the official protocols
  clip_checkpoint: str | None = None  # CDPruner's CLIP text tower (a local CLIP checkpoint directory)
  min_pixels: int | None = None       # Qwen2.5-VL image bounds (lmms-eval's model_args; None: the protocol's)
  max_pixels: int | None = None
  # Devices and processes (`experiments.runner.hosts`); they change no row's numbers beyond float rounding, so they are
  # not hashed: a run resumed on another mesh reuses the finished rows.
  mesh: str | None = None             # "data:2,fsdp:2,tensor:2" (`models.sharding.parse_mesh`)
  distributed: bool = False           # jax.distributed.initialize() with the cluster discovered
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @classmethod
  def from_flags(cls, flag_values) -> "RunConfig":
    """From absl flag values (`flags.FLAGS`): each flag is read here and nowhere else."""
    v = lambda name: flag_values[name].value
    return cls(backbone=v("backbone"), checkpoint=v("checkpoint"), methods=tuple(v("method")),
               budgets=tuple(v("budget") or ()), keep_ratios=tuple(v("keep_ratio") or ()), tasks=tuple(v("tasks")),
               data_dir=v("data_dir"), split=v("split"), limit=v("limit"), batch_size=v("batch_size"),
               output_dir=v("output_dir"), seed=v("seed"),
               tops=TopsOptions(**{f.name: v(f.name) for f in dataclasses.fields(TopsOptions)}),
               ablation=v("ablation"), max_new_tokens=v("max_new_tokens"), pictures=v("pictures"),
               protocol=v("protocol"), conv_template=v("conv_template"), resolution=v("resolution"),
               overrides=tuple(v("overrides") or ()), clip_checkpoint=v("clip_checkpoint"),
               min_pixels=v("min_pixels"), max_pixels=v("max_pixels"), mesh=v("mesh"),
               distributed=v("distributed"), coordinator_address=v("coordinator_address"),
               num_processes=v("num_processes"), process_id=v("process_id"))

  def with_defaults(self, default_checkpoint: Callable[[], str]) -> "RunConfig":
    """The checkpoint (testbed: the shipped one) and output_dir (runs/<backbone>) filled in; ValueError when the
    backbone needs a checkpoint."""
    checkpoint = self.checkpoint
    if checkpoint is None:
      if self.backbone != "testbed":
        raise ValueError(f"--backbone={self.backbone} needs --checkpoint (a local HF checkpoint dir)")
      checkpoint = default_checkpoint()
    return dataclasses.replace(self, checkpoint=checkpoint,
                               output_dir=self.output_dir or os.path.join("runs", self.backbone))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One evaluated configuration: `name` keys its rows in results.jsonl (its "@T=" is the target; the rows store the
  target under the key "budget")."""
  method: str
  target: int | None
  keep_ratio: float | None
  config: pruning.PruningConfig
  label: str  # method name in tables (ablation subsets get their own)

  @property
  def name(self) -> str:
    return self.label if self.target is None else f"{self.label}@T={self.target}"


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A checked RunConfig with everything derived from it and the model (printed at start, hashed into row keys)."""
  run: RunConfig
  methods: tuple[str, ...]
  targets: tuple[int, ...]
  keep_ratios: tuple[float | None, ...]
  nominal_tokens: int
  max_new_tokens: int
  checkpoint_fingerprint: str
  protocol: str | None = None
  conv_template: str | None = None
  skipped: tuple[str, ...] = ()       # runs of --method=all without an official protocol or input here, and why
  clip_fingerprint: str | None = None   # --clip_checkpoint's files (`fingerprint`), when a run reads CLIP

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What a method's runner configuration may read besides the target and the model."""
  family: str
  tops: TopsOptions = TopsOptions()
  criteria: tuple[str, ...] | None = None    # the TOPS ablation's subset of criteria
  overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)   # --overrides, per method
  nominal_crops: int | None = None           # the family's crops behind a target (`backbones.Backbone.nominal_groups`)


def _scalar(text: str):
  """A hyperparameter value of an `hparams` override: int, float, true/false/none, else the text."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _hparams(text: str) -> dict[str, Any]:
  """"name:value+name:value" -> {name: value}."""
  pairs = [part.partition(":") for part in text.split("+")]
  if not all(name and sep for name, sep, _ in pairs):
    raise ValueError(text)
  return {name: _scalar(value) for name, _, value in pairs}


# How --overrides spells each kind of override value (`pruning.override_kind`): the reader and an example. Sequences
# and dicts join their items with "+" (the flag's list separator is ",").
_SPELLINGS = {
    "number": (float, "0.5"),
    "int": (int, "576"),
    "bool": (lambda text: {"true": True, "false": False}[text.lower()], "true or false"),
    "str": (str, "global"),
    "ints": (lambda text: tuple(int(part) for part in text.split("+")), "2+8+16"),
    "strs": (lambda text: tuple(text.split("+")), "relevance+diversity"),
    "dict": (_hparams, "name:value+name:value, e.g. engine:dense"),
}


def parse_overrides(items) -> dict[str, dict[str, Any]]:
  """--overrides entries "method.name=value" -> {method: {name: value}}, each value read as its override's kind
  (`_SPELLINGS`); ValueError naming the bad entry (malformed, unknown, of the wrong kind, or given twice)."""
  out: dict[str, dict[str, Any]] = {}
  seen: dict[tuple[str, str], str] = {}
  for item in items or ():
    head, sep, value = item.partition("=")
    method, dot, name = head.partition(".")
    if not sep or not dot or not method or not name:
      raise ValueError(f"--overrides entry {item!r} must read method.name=value (e.g. divprune.scope=global)")
    if method not in pruning.OFFICIAL_METHODS:
      raise ValueError(f"--overrides entry {item!r}: unknown method {method!r}")
    if name not in pruning.overrides_of(method):
      raise ValueError(f"--overrides entry {item!r}: {method} takes {', '.join(pruning.overrides_of(method))}")
    if (method, name) in seen:
      raise ValueError(f"--overrides entries {seen[method, name]!r} and {item!r} both set {method}.{name}: give one")
    seen[method, name] = item
    kind, what = pruning.override_kind(name)
    read, example = _SPELLINGS[kind]
    try:
      out.setdefault(method, {})[name] = read(value)
    except (ValueError, KeyError):
      raise ValueError(f"--overrides entry {item!r}: {name} takes {what}, spelled {example}") from None
  return out


def method_config(method: str, target: int, model, ctx: MethodContext) -> pruning.PruningConfig:
  """The run's PruningConfig: `pruning.method_config`'s official protocol with the invocation's overrides."""
  o = dict(ctx.overrides.get(method, {}))
  if method == "tops":
    o.update({name: value for name, (_, value) in ctx.tops.as_overrides().items()})
    if ctx.criteria:
      o["criteria"] = tuple(ctx.criteria)
  if method == "cdpruner" and cdpruner_fallback(ctx) and "relevance" not in o:
    o["relevance"] = "text"
  if method == "pooling" and ctx.family not in pruning.methods.base.VARIABLE_GRID:   # else NoProtocol
    o["hparams"] = dict(o.get("hparams", {}), grid=model.config.token_grid)
  if method == "pdrop" and "num_visual" not in o:      # every image's own int(n * ratio) fits the static keep
    o["num_visual"] = model.config.max_image_tokens
  return pruning.method_config(method, family=ctx.family, target=target, num_layers=model.config.text.num_hidden_layers,
                               crops=ctx.nominal_crops, **o)


def cdpruner_fallback(ctx: MethodContext) -> bool:
  """Whether CDPruner runs on the documented fallback relevance (no CLIP text tower): the testbed, whose vision
  tower is not a CLIP checkpoint's, a family whose protocol is the fallback (no CLS tower: Qwen2.5-VL), or an
  explicit cdpruner.relevance=text override."""
  return (ctx.family == "testbed" or ctx.family in pruning.methods.base.NO_CLS
          or ctx.overrides.get("cdpruner", {}).get("relevance") == "text")


RUNNABLE = pruning.OFFICIAL_METHODS
_NEEDS_CLIP = ("cdpruner's relevance is CLIP's text tower (its official code): pass --clip_checkpoint=DIR, a local "
               "CLIP checkpoint such as openai/clip-vit-large-patch14-336, or run the documented fallback "
               "(LLM-embedding relevance, a different method) with --overrides=cdpruner.relevance=text")
FULL = pruning.PruningConfig(method="tops")  # no Stage I budget and no Stage II step: the unpruned model


def _targets(run: RunConfig, nominal_tokens: int, defaults: tuple[int, ...] = ()) -> list[tuple[int, float | None]]:
  """(target, keep ratio or None) per run, from --budget or --keep_ratio, else the backbone's default budgets
  (`defaults`) or ratios (`RATIOS`)."""
  if run.budgets and run.keep_ratios:
    raise ValueError("--budget and --keep_ratio are exclusive: give one")
  if not run.budgets and not run.keep_ratios and defaults:
    return [(int(b), None) for b in defaults]
  if run.budgets:
    try:
      return [(int(b), None) for b in run.budgets]
    except ValueError:
      raise ValueError(f"--budget must be integers, got {list(run.budgets)}") from None
  try:
    ratios = [float(r) for r in (run.keep_ratios or RATIOS)]
  except ValueError:
    raise ValueError(f"--keep_ratio must be numbers, got {list(run.keep_ratios)}") from None
  if any(not 0 < r <= 1 for r in ratios):
    raise ValueError(f"--keep_ratio values must lie in (0, 1], got {ratios}")
  return [(max(4, round(r * nominal_tokens)), r) for r in ratios]


def resolve(run: RunConfig, model) -> tuple[Resolved, list[RunSpec]]:
  """Checks the configuration for consistency and returns (the resolved configuration, the runs). Raises ValueError
  naming the flag."""
  backbone = backbone_of(run)
  every = list(run.methods) == ["all"]
  if every:     # every method with a protocol on this backbone
    methods = [m for m in RUNNABLE if pruning.supports(m, backbone.family)]
  else:
    methods = list(run.methods)
  unknown = [m for m in methods if m not in RUNNABLE]
  if unknown:
    raise ValueError(f"--method: unknown method(s) {', '.join(unknown)}; known: all, {', '.join(RUNNABLE)}")
  unsupported = [m for m in methods if not pruning.supports(m, backbone.family)]
  if unsupported:
    raise ValueError(f"--method: {', '.join(unsupported)} has no protocol on --backbone={run.backbone} (its "
                     "official code has no such path; see models/pruning/protocols.py)")
  overrides = parse_overrides(run.overrides)
  stray = sorted(set(overrides) - set(methods))
  if stray:
    raise ValueError(f"--overrides names {', '.join(stray)}, which --method={','.join(methods)} does not run")
  _check_tops_flags(run, overrides.get("tops", {}))
  family = backbones.get(backbone.model_type)
  nominal_tokens = family.nominal_tokens(model.config)
  targets = _targets(run, nominal_tokens, backbone.budgets)
  if any(target < 1 for target, _ in targets):
    raise ValueError(f"--budget values must be positive, got {[target for target, _ in targets]}")
  most = model.config.max_image_tokens
  if any(target > most for target, _ in targets):
    raise ValueError(f"--budget {max(target for target, _ in targets)} exceeds the {most} visual tokens an image of "
                     "this backbone can have")
  if run.ablation and methods != ["tops"]:
    raise ValueError("--ablation runs the TOPS criteria subsets: use it with --method=tops")
  if "tops" not in methods and run.tops.given():
    raise ValueError(f"{', '.join('--' + k for k in run.tops.given())} only affect tops, which is not among "
                     f"--method={','.join(methods)}")
  if run.limit < 0 or run.batch_size < 1:
    raise ValueError("--limit must be >= 0 and --batch_size >= 1")
  if run.max_new_tokens is not None and run.max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens must be >= 1 (or unset for the backbone's {backbone.max_new_tokens}), "
                     f"got {run.max_new_tokens}")
  known = task_names()
  in_memory = [t for t in run.tasks if t in IN_MEMORY_TASKS]
  if in_memory and not backbone.in_memory:
    raise ValueError(f"--backbone={run.backbone} runs the benchmark tasks, not {', '.join(in_memory)} (--tasks=pope,"
                     "mme,...)")
  if not run.tasks:
    raise ValueError(f"--tasks is empty: name at least one task ({', '.join(known)})")
  unknown_tasks = [t for t in run.tasks if t not in known]
  if unknown_tasks:
    raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown_tasks)}; known: {', '.join(known)}")
  if "vqa_jsonl" in run.tasks and not run.data_dir:
    raise ValueError("--tasks=vqa_jsonl needs --data_dir (a directory with questions.jsonl)")
  protocol, template = _benchmark_settings(run, backbone, model)

  ctx = MethodContext(family=backbone.family, tops=run.tops, overrides=overrides,
                      nominal_crops=family.nominal_groups)
  no_clip = "cdpruner" in methods and not cdpruner_fallback(ctx) and not run.clip_checkpoint
  if no_clip and not every:     # "all" lists its runs among the skipped ones instead
    raise ValueError(_NEEDS_CLIP)
  runs = [RunSpec("full", None, None, FULL, "full")]
  skipped: list[str] = []
  subsets = [c for r in (1, 2, 3) for c in itertools.combinations(tops_lib.CRITERIA, r)]
  for method in methods:
    if method == "cdpruner" and no_clip:
      skipped.extend(f"cdpruner@T={target}: {_NEEDS_CLIP}" for target, _ in targets)
      continue
    variants = [(method, ctx)]
    if run.ablation:
      variants = [("tops[" + "+".join(c[0].upper() for c in s) + "]", dataclasses.replace(ctx, criteria=s))
                  for s in subsets]
    for label, variant in variants:
      for target, ratio in targets:
        try:
          config = method_config(method, target, model, variant)
        except pruning.NoProtocol as e:
          if not every:
            raise ValueError(f"--method={method}: {e}") from None
          skipped.append(f"{label}@T={target}: {e}")
          continue
        config.check_model(model)
        if method == "cdpruner" and config.stage1_relevance != "clip_text":
          label = "cdpruner-text"      # the fallback is another method: never reported under CDPruner's name
        runs.append(RunSpec(method, target, ratio, config, label))
  clip_fingerprint = None
  if run.clip_checkpoint and any(reads_clip(spec.config) for spec in runs):
    if not os.path.isdir(run.clip_checkpoint):
      raise ValueError(f"--clip_checkpoint {run.clip_checkpoint!r} is not a directory")
    clip_fingerprint = fingerprint(run.clip_checkpoint)
  resolved = Resolved(run=run, methods=tuple(methods), targets=tuple(target for target, _ in targets),
                      keep_ratios=tuple(r for _, r in targets), nominal_tokens=nominal_tokens,
                      max_new_tokens=backbone.max_new_tokens if run.max_new_tokens is None else run.max_new_tokens,
                      checkpoint_fingerprint=fingerprint(run.checkpoint), protocol=protocol,
                      conv_template=template, skipped=tuple(skipped), clip_fingerprint=clip_fingerprint)
  return resolved, runs


def _check_tops_flags(run: RunConfig, given: dict[str, Any]):
  """ValueError when a tops flag and a tops override set the same thing (neither may silently win)."""
  clashes = [f"--{flag}={value} and --overrides=tops.{name}={given[name]}"
             for name, (flag, value) in run.tops.as_overrides().items() if name in given]
  if run.ablation and "criteria" in given:
    clashes.append("--ablation (every subset of the criteria) and --overrides=tops.criteria")
  if clashes:
    raise ValueError(f"{'; '.join(clashes)} set the same tops setting: give one")


def reads_clip(config: pruning.PruningConfig) -> bool:
  """Whether a run reads --clip_checkpoint (CDPruner's CLIP text relevance)."""
  return config.stage1_relevance == "clip_text"


def task_names() -> tuple[str, ...]:
  from experiments.benchmarks import registry  # pylint: disable=g-import-not-at-top
  return IN_MEMORY_TASKS + tuple(registry.TASKS)


def _benchmark_settings(run: RunConfig, backbone: Backbone, model) -> tuple[str | None, str | None]:
  """(protocol, conversation template) of the benchmark tasks, checked; (None, None) without benchmark tasks."""
  from experiments.runner import conversation  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import base  # pylint: disable=g-import-not-at-top
  benchmarks = [t for t in run.tasks if t not in IN_MEMORY_TASKS]
  if not benchmarks:
    for name, value in (("protocol", run.protocol), ("conv_template", run.conv_template)):
      if value is not None:
        raise ValueError(f"--{name} applies to the benchmark tasks only; --tasks={','.join(run.tasks)} has none")
    return None, None
  if backbone.protocol is None:
    raise ValueError(f"--tasks={','.join(benchmarks)} need a hub checkpoint (--backbone=llava_1_5, llava_next or "
                     f"qwen2_5_vl); --backbone={run.backbone} is not one")
  if not run.data_dir:
    raise ValueError(f"--tasks={','.join(benchmarks)} need --data_dir: a folder of dataset snapshots (ROOT/POPE, "
                     "ROOT/MME, ...), or the one dataset's snapshot when one task is given")
  protocol = run.protocol or backbone.protocol
  if protocol not in base.PROTOCOLS:
    raise ValueError(f"--protocol must be one of {', '.join(base.PROTOCOLS)}, got {protocol!r}")
  template = run.conv_template or backbone.conv_template or conversation.default_template(model.config)
  if template not in conversation.TEMPLATES:
    raise ValueError(f"--conv_template must be one of {', '.join(conversation.TEMPLATES)}, got {template!r}")
  if run.resolution not in backbone.resolutions:
    raise ValueError(f"--resolution must be one of {', '.join(backbone.resolutions)} on --backbone={run.backbone}, "
                     f"got {run.resolution!r}")
  backbone.inputs.settings(protocol)          # ValueError for a protocol the family has no inputs for
  if run.resolution != "native" and backbone.square_pad:
    raise ValueError("--resolution=fixed_672 is LLaVA-NeXT's fixed input; LLaVA-1.5 pads to a square")
  return protocol, template


def run_hash_fields(resolved: Resolved, task: str) -> dict[str, Any]:
  """The settings outside a run's pruning config that change its rows' numbers (see `evaluate.run_hash`); the
  benchmark tasks add their protocol, template and image resolution."""
  r = resolved.run
  fields = dict(backbone=r.backbone, checkpoint=r.checkpoint, checkpoint_fingerprint=resolved.checkpoint_fingerprint,
                data_dir=r.data_dir, split=r.split, seed=r.seed, max_new_tokens=resolved.max_new_tokens,
                batch_size=r.batch_size)
  if r.clip_checkpoint:
    fields["clip_checkpoint"] = r.clip_checkpoint
  if resolved.clip_fingerprint:     # hashed into the CLIP runs' rows only (`evaluate.run_fields`)
    fields["clip_checkpoint_fingerprint"] = resolved.clip_fingerprint
  if task not in IN_MEMORY_TASKS:
    fields.update(protocol=resolved.protocol, conv_template=resolved.conv_template, resolution=r.resolution,
                  limit=r.limit)
    fields.update(backbone_of(r).inputs.settings(resolved.protocol))   # LLaVA: none; Qwen: its pixel bounds
  return fields
