"""Experiments: the absl entry points (`run`, `score`) and, by role, the runner's library (`runner`), the papers'
benchmarks (`benchmarks`), the synthetic VQA benchmark (`synthvqa`), reports and cost models (`analysis`), measurement
scripts (`bench`) and the testbed model with the research that trains and probes it (`testbed`)."""
