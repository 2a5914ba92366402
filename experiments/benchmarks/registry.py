"""Every benchmark task by its `--tasks` name, one literal entry per task (each module's `TASKS` defines it)."""

from experiments.benchmarks import ai2d, base, gqa, hallusionbench, mmbench, mme, mmstar
from experiments.benchmarks import mmvet, pope, scienceqa, textvqa, vqav2

__all__ = ["TASKS", "MODULES"]

MODULES = (pope, gqa, mme, textvqa, vqav2, scienceqa, mmbench, mmstar, ai2d, hallusionbench, mmvet)

TASKS: dict[str, base.Task] = {
    "pope": pope.TASKS["pope"],
    "pope_adversarial": pope.TASKS["pope_adversarial"],
    "pope_popular": pope.TASKS["pope_popular"],
    "pope_random": pope.TASKS["pope_random"],
    "gqa": gqa.TASKS["gqa"],
    "mme": mme.TASKS["mme"],
    "textvqa_val": textvqa.TASKS["textvqa_val"],
    "textvqa_val_ocr": textvqa.TASKS["textvqa_val_ocr"],
    "vqav2_val": vqav2.TASKS["vqav2_val"],
    "vqav2_val_lite": vqav2.TASKS["vqav2_val_lite"],
    "scienceqa_img": scienceqa.TASKS["scienceqa_img"],
    "mmbench_en_dev": mmbench.TASKS["mmbench_en_dev"],
    "mmbench_cn_dev": mmbench.TASKS["mmbench_cn_dev"],
    "mmstar": mmstar.TASKS["mmstar"],
    "ai2d": ai2d.TASKS["ai2d"],
    "hallusionbench_image": hallusionbench.TASKS["hallusionbench_image"],
    "mmvet": mmvet.TASKS["mmvet"],
}
