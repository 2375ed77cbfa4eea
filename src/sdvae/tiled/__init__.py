"""Exact tiled encoding: the encoder tile by tile with whole-image statistics, its activation maps in memory or
scratch files, and the plan that fits a memory budget."""
