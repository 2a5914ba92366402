"""How each method is run: `method_config(method, family=, target=, num_layers=, **overrides) -> PruningConfig`, and
the public schedule builders (`tops_schedule`, `pdrop_schedule`, `sparsevlm_schedule`).

Each method's protocol, its tables and its sources live in its module of `models.pruning.methods`; this module checks
the arguments, applies the family's nominal crops and builds the `PruningConfig`. The table below is their index.

The default is the method's OFFICIAL protocol on that backbone at that budget T (the tokens the papers' tables
name: 640 / 320 / 160 on LLaVA-NeXT, 128 / 64 / 32 on LLaVA-1.5), as its official code runs it; our own variants are
named overrides, each documented below with the reason it exists. `family` is a `models.backbones` name ("llava",
"llava_next") or an older spelling ("llava-1.5", "llava_1_5", "llava-next"), or "testbed" (a small LLaVA-NeXT: it runs
LLaVA-NeXT's protocols). On LLaVA-1.5 (one crop, no newlines) every per-crop layout selects what the global one does.

| method | official protocol (LLaVA-NeXT) | source read |
|---|---|---|
| tops | the paper's schedule: Stage I N -> 2T (CLS relevance, (0.5, 0.5)), L12: -> T, L24: -> T/4 with text raters | arXiv 2606.27161, Alg. 1-2 |
| cdpruner | CLIP text relevance (negated, min-max over all crops), T // 5 per crop among its 576 tokens; the picks go to the LLM on the padded canvas (base crop, then the grid canvas row-major), NO unpadding and NO newlines: its `prepare_inputs_labels_for_multimodal` strips "_unpad" from spatial_unpad before the merge | Theia-4869/CDPruner @9541616 llava/model/llava_arch.py |
| divprune | the whole packed sequence (newlines too) is the candidate set, round(T / 2880 x its length) kept, packed order | vbdi/divprune LLaVA/llava/model/llava_arch.py |
| scope | CLIP layer -2 features, CLS attention saliency; int(T / crops) per crop over the padded crops, no unpadding, no newlines; base crop, then the grid canvas row-major | kinredon/SCOPE scope/clip_encoder.py, llava_arch.py |
| visionzip | per crop [CLS, dominant, contextual] (T // 5 per crop, 54 : 10 of every 64), merged in the vision space; base crop, grid dominant (canvas row-major), grid CLS, grid contextual | dvlab-research/VisionZip visionzip/main.py, llava_arch.py |
| dart | pruning before layer 2 to 4 + 8 floor(T / 8) tokens, original positions | ZichenWen1/DART, llmc dart.py |
| fastv | layer-1 last-token attention, pruning before layer 2 to T, original positions | pkunlp-icler/FastV |
| vispruner | CLS-attention important tokens (half of each crop's budget) + diverse remainder on layer -2 features; T // 5 per crop, CDPruner's padded-canvas layout (the same "_unpad" strip: no unpadding, no newlines) | Theia-4869/VisPruner @aefa01a llava/model/llava_arch.py |
| prumerge_plus | LLaVA-1.5 only: the last CLIP layer's full-width CLS attention, the fixed-count branch (T/2 by attention + T/2 strided), each merged with its 32 nearest tokens by key, then the extra token of the rest: T + 1 rows in its order | 42Shawn/LLaVA-PruMerge clip_encoder.py |
| pdrop | before layers 8, 16, 24 (7B and 13B alike) the last instruction token's attention keeps int(n lambda^s) of each image's n tokens, contiguous positions; T is its "average visual tokens per layer" (its Table 2), lambda solved for it (0.5 is the published 192-of-576 setting), layers (2, 8, 16) where (8, 16, 24) cannot reach T (the author's 64-token answer, issue #29) | Cooperx521/PyramidDrop @6444f30 `modeling_llama_pdrop.py` |
| sparsevlm | LLaVA-1.5 only: text raters chosen once from the input embeddings, pruning after layers 2, 6, 15, 19 with the rank-based count (scale, bias) of the published 192 / 128 / 64 settings, recycled tokens clustered (DPC-KNN) and merged after the kept ones | Gumpest/SparseVLMs v1 @b72c5d6 `modelling_sparse_llama.py`, `score.py`, `utils.py` |
| trimtokenator, random, pooling | T per image, globally (no official LLaVA-NeXT layout: TrimTokenator's code is not public) | |

CDPruner and VisPruner also override LLaVA's `select_best_resolution` with the single resolution 672 x 672 (their
comment: "to get 2880 visual tokens"), so every image there has a 2 x 2 grid. That is image preprocessing, shared by
every run of an invocation, so it is not part of a method's config: `--resolution=fixed_672` gives the same crop count
(5) but squashes the image to 672 x 672 instead of padding it inside 672 x 672; with native resolution an image has
3 to 5 crops and each real crop still gets T // 5.

Named overrides (keyword arguments; unknown ones raise, naming the method's accepted set):
- `scope`: "official" (default) or a `PruningConfig.stage1_scope` ("global", "per_crop", "ratio", "crop_fixed",
  "crop_divided"); with a non-official scope the grid is "unpadded" (ours: every budget over the tokens the LLM
  would see) unless `grid` says otherwise. Reason: budgets comparable across methods (exactly T per image).
- `grid`, `newlines`, `features`: the `stage1_grid`, `newlines`, `stage1_features` fields. `newlines="drop"` is our
  LLaVA-NeXT default for the methods without an official layout (exactly T visual tokens reach the LLM).
- `relevance`: `stage1_relevance`. CDPruner's "text" is the documented FALLBACK when no CLIP checkpoint is at hand:
  cosine of the projector outputs with the LLM's input embeddings of the text after the image, not negated. It is a
  different method from CDPruner's and is labelled as such in the runner.
- `visionzip_cls=False`: VisionZip without the CLS token, T patch tokens globally in ascending order (ours).
- `dart_count="exact"`: DART keeps exactly T tokens instead of the official 4 + 8 floor(T / 8).
- `mode="adaptive"` (PruMerge+): the released inference path's IQR-adaptive count, with T as the static upper
  bound; the default "fixed" is its fixed-count branch, the only way to fill a table at a given T.
- tops: `stage1_alpha`, `stage1_lam`, `stage2_alpha`, `stage2_lam` (None: the paper's), `normalize`, `criteria`,
  plus `scope` / `newlines` for Stage I and any Stage II field the schedule takes (`models.pruning.tops_schedule`).
- `hparams`: extra keyword arguments of the method (merged into its stage's hyperparameters).
"""

from models.pruning import methods
from models.pruning.config import PruningConfig
from models.pruning.methods import pdrop as pdrop_lib
from models.pruning.methods import sparsevlm as sparsevlm_method
from models.pruning.methods import tops as tops_lib
from models.pruning.methods import base

__all__ = ["FAMILIES", "method_config", "OFFICIAL_METHODS", "overrides_of", "supports", "NoProtocol", "tops_schedule",
           "tops_layers", "pdrop_schedule", "PDROP_LAYERS", "PDROP_LAMBDA", "sparsevlm_schedule"]

FAMILIES, NoProtocol = base.FAMILIES, base.NoProtocol
OFFICIAL_METHODS = tuple(methods.METHODS)
tops_layers = tops_lib.layers
PDROP_LAYERS, PDROP_LAMBDA = pdrop_lib.LAYERS, pdrop_lib.LAMBDA


def supports(method: str, family: str) -> bool:
  """Whether `method` has a protocol on `family` at all (PruMerge+'s and SparseVLM's official code are LLaVA-1.5
  only); depth and budget can still rule a run out (`NoProtocol`)."""
  return base.family(family) not in methods.get(method).unsupported


def overrides_of(method: str) -> tuple[str, ...]:
  """The named overrides `method_config` accepts for `method`."""
  return methods.get(method).overrides


def method_config(method: str, *, family: str, target: int, num_layers: int, crops: int | None = None,
                  **overrides) -> PruningConfig:
  """The official protocol of `method` on `family` at budget `target` (see the module docstring), with overrides.

  crops: the nominal crops per image behind T (N_nominal / tokens per crop: LLaVA-NeXT 2880 / 576 = 5, LLaVA-1.5 1;
    the runner passes its backbone's); None: 5 on LLaVA-NeXT families, 1 on LLaVA-1.5.
  Raises ValueError naming the method, the family or the override that does not apply (`NoProtocol` where the
  official code has no setting for this family, depth or budget).
  """
  if method not in methods.METHODS:
    raise ValueError(f"unknown method {method!r}; method_config knows: {', '.join(methods.METHODS)}")
  spec = methods.METHODS[method]
  name = base.family(family)
  if name not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)} (or their older spellings "
                     "llava-1.5, llava_1_5, llava-next)")
  if isinstance(target, bool) or not isinstance(target, int) or target < 1:
    raise ValueError(f"target T must be a positive int, got {target!r}")
  unknown = sorted(set(overrides) - set(spec.overrides))
  if unknown:
    raise ValueError(f"{method}: unknown override(s) {', '.join(unknown)}; {method} takes: "
                     f"{', '.join(spec.overrides)}")
  o = {k: v for k, v in overrides.items() if v is not None}
  if crops is None:
    crops = base.nominal_groups(name)
  if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
    raise ValueError(f"crops must be a positive int, got {crops!r}")
  o["crops"] = crops
  if not supports(method, family):
    raise NoProtocol(f"{method} has no {family} protocol: its official code runs LLaVA-1.5 only (no anyres path)")
  stage1, stage2 = spec.protocol(target, name, num_layers, o)
  return PruningConfig(method=method, stage1=stage1, stage2=stage2)


def tops_schedule(num_layers: int, target: int, **kwargs) -> PruningConfig:
  """The TOPS schedule for target T (`methods.tops.schedule`, its arguments): Stage I N -> 2T, layer
  round(12/32 L): -> T, layer round(24/32 L): -> T // 4, the paper's (alpha, lambda)."""
  stage1, stage2 = tops_lib.schedule(num_layers, target, **kwargs)
  return PruningConfig(method="tops", stage1=stage1, stage2=stage2)



def pdrop_schedule(num_layers: int, target: int | None = None, **kwargs) -> PruningConfig:
  """PyramidDrop (method "pdrop"), `methods.pdrop.schedule` (its arguments)."""
  return PruningConfig(method="pdrop", stage2=pdrop_lib.schedule(num_layers, target, **kwargs))


def sparsevlm_schedule(num_layers: int, target: int = 192, **kwargs) -> PruningConfig:
  """SparseVLM (method "sparsevlm") as its official code runs on LLaVA-1.5, `methods.sparsevlm.stage2` (its
  arguments)."""
  return PruningConfig(method="sparsevlm", stage2=sparsevlm_method.stage2(num_layers, target, **kwargs))
