"""The fast path: kernels that each equal the plain op they replace (exact GroupNorm, row bands, Winograd), the CPU
probes that choose them, and the one switch, `fast_path`."""

from .path import enabled, fast_path, run_layer, runner

__all__ = ["enabled", "fast_path", "run_layer", "runner"]
