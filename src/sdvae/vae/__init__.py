"""The public modules, `VaeEncoder` and `VaeDecoder`: the network run on the fast path, tiled where memory asks."""
