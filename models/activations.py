"""Activation functions by their transformers (ACT2FN) names, for the names LLaVA checkpoints use. A leaf module:
the vision tower, the decoder and the projector all read it.
"""

import jax

__all__ = ["ACTIVATIONS"]


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions, for the names LLaVA checkpoints use. "gelu" is the exact (erf) GELU.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
