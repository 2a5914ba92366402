"""The papers' benchmarks on local snapshots of their lmms-lab dataset repositories (`base.Task`, one module per
benchmark; `registry` names them all)."""
