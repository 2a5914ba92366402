"""What a run's rows and the ports cost and mean: tables and plots (`report`), kept-token pictures (`pictures`), the
FLOPs and memory model (`flops`), and the greedy-vs-exhaustive TOPS script (`tops_approx`)."""
