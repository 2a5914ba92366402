"""Flax NNX ports of the LLaVA family, loaded from local Hugging Face checkpoints.

    import models
    model = models.load_pretrained("/ckpt/llava-1.5-7b-hf", dtype=jnp.bfloat16)

Modules: `family` (the interface a model family implements for the pruning stages, and `VisualTokens`, the record
it hands them), `backbones` (the registry of families, keyed by checkpoint `model_type`), `clip` (vision tower),
`llama` (LLaMA/Vicuna/Mistral decoder, KV cache), `llava` (LLaVA-1.5), `llava_next` (LLaVA-NeXT anyres), `loading`
(reading checkpoints), `saving` (writing them),
`conversion` (conversion rules and canonical names), `config_fields` (config.json type checks), `activations`,
`checks` (input checks), `generate` (greedy decoding), `pruning` (Stage I/II hooks), `outputs` (named outputs),
`shapes` (random-weight model shapes for the benchmarks), `sharding` (meshes), `attention`, `anyres`, `clip_text`.
`conversion`, `config_fields`, `activations` and `family` are leaves: the family modules import them, `backbones`
imports the families and `loading` imports `backbones`, so no import runs in a circle.

Axis legend: one letter per axis along the whole data path (image -> tower -> projector -> Stage I -> decoder
layers with Stage II -> logits -> answer), used in every docstring and shape comment of `models`, `tops_jax` and
`experiments`:

    B  batch rows (prompts of zero, one or several images)      I  images of a batch, in row order
    P  groups per image, a quota each (`models.family`: crops, tiles, frames; anyres: base crop + grid crops,
       padded)                                                   T  vision tokens per group (CLS dropped; +1 with it)
    N  packed image tokens per image: the Stage I candidates (LLaVA-1.5: the patches; NeXT: the packing bucket)
    R  position components (1: RoPE, 3: M-RoPE): position ids are int32[R, B, S]
    K  kept tokens (a selection's `keep`)                         C  candidates of a Stage II step
    S  sequence positions (tokens of a decoder call; the keys they attend over)
    A  text tokens after the image (the text raters)             Q  query rows read from a layer (raters, last token)
    D  text (decoder) width       Dv  vision width               Dh  head width
    H  query heads                Hkv key/value heads            L   decoder layers
    G  layer segments (Stage II steps + 1)                        V   vocabulary
    M  new tokens                 W  KV cache capacity (slots)    J   most images in a row

Count vocabulary: one name per count of kept tokens, in code, docstrings and messages alike (never the letter T,
which is only the axis above):

    target    the token count a paper's table column names: `pruning.method_config(target=)`, `tops_schedule`, each
              method's `protocol(target, ...)`. Stored and public names keep their spelling: the runner's --budget
              flag and its rows' "budget" key, a row label's "@T=" ("tops@T=128"), the tables' T column, the bench
              rows' "T" key, the `budget` of `tops_jax.dart.kept_count` and of SparseVLM's official schedules
    budget    Stage I's kept tokens per image (`Stage1.budget`, flat `stage1_budget`): what the LLM receives
    keep      the count one selection returns (`tops_jax` functions' `keep=`, a Stage II step's keep)
    quota     one group's (crop, tile, frame) share of the budget (the official LLaVA-NeXT layouts: budget // 5)
    capacity  the static image rows per image after Stage I: the budget plus the kept structural slots (W is the KV
              cache's)
"""

from models.loading import load_pretrained

__all__ = ["load_pretrained"]
