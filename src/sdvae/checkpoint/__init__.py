"""Checkpoints on disk: file formats, every key layout renamed in one place, the config found or inferred, loading
with a report of what was dropped."""
