"""Experiments: the procedural VQA benchmark, the absl runners, metrics and reports; `experiments.testbed`, the
testbed model with the research that trains and probes it."""
