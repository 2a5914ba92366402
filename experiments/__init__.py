"""Experiments: the procedural VQA benchmark, the testbed tokenizer, the absl runners, metrics and reports."""
