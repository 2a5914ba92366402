"""Flax NNX ports of the LLaVA family, loaded from local Hugging Face checkpoints.

    import models
    model = models.load_pretrained("/ckpt/llava-1.5-7b-hf", dtype=jnp.bfloat16)

Modules: `clip` (vision tower), `llama` (LLaMA/Vicuna/Mistral decoder, KV cache), `llava` (LLaVA-1.5),
`llava_next` (LLaVA-NeXT anyres), `loading` (reading checkpoints, the family registry), `saving` (writing them),
`conversion` (conversion rules and canonical names), `config_fields` (config.json type checks), `activations`,
`checks` (input checks), `generate` (greedy decoding), `pruning` (Stage I/II hooks), `outputs` (named outputs).
`conversion`, `config_fields` and `activations` are leaves: the family modules import them, `loading` imports the
families, so no import runs in a circle.
"""

from models.loading import load_pretrained

__all__ = ["load_pretrained"]
