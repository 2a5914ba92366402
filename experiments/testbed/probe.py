r"""Linear probes of what a testbed checkpoint's visual tokens encode: where spatial reasoning breaks.

    python -m experiments.testbed.probe                       # the shipped experiments/testbed_ckpt
    python -m experiments.testbed.probe --checkpoint=/tmp/ckpt --examples=400

On spatial questions of the `--split` split it reports:
1. attention mass of heads 0 and 1 of the grounded layers at the answer position on the two named objects' base-crop
   tokens (`batches.encode`'s head_evidence: what `losses.loss_fn` trains them to look at);
2. how well the row and the column of each base-crop token can be read linearly from the tower's output and from the
   projector's output (held-out R^2 of a ridge regression; 1 = exact);
3. how well the asked relation can be read linearly from mean(embedding of object A) - mean(embedding of object B),
   the signal the decoder's two grounded heads can pass on (held-out accuracy; chance 0.5), per axis.
4. the same relation read linearly from the residual stream at the answer position, entering each decoder layer and
   leaving the last (`residual_relation_accuracy_layer{l}_{axis}`, l = 0 .. L): where along the decoder the relation
   the grounded heads could pass on is (or is not) carried to the answer;
5. the asked direction within the axis ("left" vs "right", "above" vs "below") read linearly from the same residual
   stream (`residual_direction_accuracy_layer{l}_{axis}`): the word the answer must combine the places with.
Fits use the first half of the examples and scores the second half. If (1) is high and (3) is low, the decoder is
shown the right tokens but the tokens do not say where they are; if (1) and (3) are high and (4) stays at chance
after the grounded layers, the heads look at the right tokens but do not carry their positions to the answer; if
(4) is high and (5) at chance, the places reach the answer but the asked direction does not.
"""

import json

from absl import app
from absl import flags

import models
from experiments.synthvqa import vqa
from experiments.testbed import model as model_lib
from experiments.testbed import probes

_CHECKPOINT = flags.DEFINE_string("checkpoint", model_lib.DEFAULT_CKPT, "Testbed checkpoint directory.")
_SPLIT = flags.DEFINE_enum("split", "validation", ("train", "validation", "test"), "Split to draw questions from.")
_EXAMPLES = flags.DEFINE_integer("examples", 1600, "Spatial questions to probe (half fit, half scored).")
_SEED = flags.DEFINE_integer("seed", 0, "Split seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per forward pass.")
_RIDGE = flags.DEFINE_float("ridge", 1.0, "Ridge penalty of the probes.")


def main(argv):
  del argv
  model = models.load_pretrained(_CHECKPOINT.value)
  weights = {f: float(f == "spatial") for f in vqa.FAMILIES}
  examples = vqa.make_split(_SPLIT.value, _EXAMPLES.value, seed=_SEED.value, weights=weights)
  result = probes.probe(model, examples, _BATCH_SIZE.value, _RIDGE.value)
  print(json.dumps({"checkpoint": _CHECKPOINT.value, "examples": len(examples),
                    **{k: round(v, 4) for k, v in result.items()}}, indent=1))


if __name__ == "__main__":
  app.run(main)
