"""Latent datasets: input sources, image preparation, the output store and its format, the reader, the job (plan,
resume), the shard unit every engine runs, and the engines."""
