"""Flax NNX ports of the LLaVA family, loaded from local Hugging Face checkpoints.

    import models
    model = models.load_pretrained("/ckpt/llava-1.5-7b-hf", dtype=jnp.bfloat16)

Modules: `clip` (vision tower), `llama` (LLaMA/Vicuna/Mistral decoder, KV cache), `llava` (LLaVA-1.5),
`llava_next` (LLaVA-NeXT anyres), `loading` (checkpoint conversion, family registry), `generate` (greedy decoding),
`outputs` (named outputs).
"""

from models.loading import load_pretrained

__all__ = ["load_pretrained"]
