r"""Smoke run of the benchmark path at the real geometry: builds a llava-hf-layout LLaVA-NeXT checkpoint (CLIP at
336 px with 14-px patches, the LLaVA-1.6 pinpoints, a 32-layer decoder so the paper's TOPS settings apply; tiny
widths, random weights, its tokenizer and processor files) and a POPE snapshot in the lmms-lab layout (COCO-sized
640 x 480 images), then runs the runner's default LLaVA-NeXT command on it: every method at T = 640 / 320 / 160.

    .venv/bin/python scripts/llava_next_pope.py --workdir=/tmp/pope_smoke            # ~the command in BUILD.md
    .venv/bin/python scripts/llava_next_pope.py --workdir=/tmp/s --limit=2 --extra=--method=tops,divprune

Needs the test extra (torch, for writing the checkpoint with transformers). The numbers mean nothing (random
weights); what it shows is that the real layouts, budgets and protocol run end to end.
"""

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))   # the fixture writers (model_factories, lmms_fixtures)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--limit", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--extra", action="append", default=[], help="more runner flags")
  args = parser.parse_args()
  import lmms_fixtures  # pylint: disable=g-import-not-at-top
  import model_factories  # pylint: disable=g-import-not-at-top
  ckpt = os.path.join(args.workdir, "llava-v1.6-tiny-hf")
  if not os.path.exists(os.path.join(ckpt, "config.json")):
    model_factories.tiny_llava_hf(args.workdir, "llava_next", name="llava-v1.6-tiny-hf", text_layers=32)
  root = os.path.join(args.workdir, "data")
  if not os.path.isdir(os.path.join(root, "POPE")):
    rows = [dict(id=str(i), question_id=str(3000 + i), question=f"Is there a {('dog', 'car', 'cup')[i % 3]} in the "
                 "image?", answer=("yes", "no")[i % 2], image_source=f"COCO_val2014_{i:012d}",
                 image=lmms_fixtures.image_cell(i, (480, 640)), category=("adversarial", "popular", "random")[i % 3])
            for i in range(max(args.limit, 6))]
    lmms_fixtures.write_split(os.path.join(root, "POPE"), None, "test", rows, lmms_fixtures.SCHEMAS["POPE"],
                              num_shards=3)
  command = [sys.executable, "-m", "experiments.run", "--backbone=llava_next", f"--checkpoint={ckpt}", "--tasks=pope",
             f"--data_dir={root}", f"--limit={args.limit}", f"--batch_size={args.batch_size}",
             f"--output_dir={os.path.join(args.workdir, 'runs')}", "--pictures=0", *args.extra]
  print(" ".join(command), flush=True)
  sys.exit(subprocess.call(command, cwd=REPO))


if __name__ == "__main__":
  main()
