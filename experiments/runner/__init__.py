"""The runner's library behind `experiments.run`: the plan of an invocation, its tasks, the evaluation loops, the
results log and the hosts of a sharded run."""
