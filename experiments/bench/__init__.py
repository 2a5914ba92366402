"""Measurement scripts, each its own absl entry point: selection speed (`selection`), end-to-end speed beside
transformers (`e2e`), memory per device on a mesh (`shard_memory`)."""
