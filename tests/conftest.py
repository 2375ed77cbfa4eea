"""Fixtures shared by the encode tests: a small random-weight VAE saved as a diffusers folder, and good photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import TINY, reference_vae


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A diffusers folder holding a small VAE (64 px sample size) with random weights."""
    path = tmp_path_factory.mktemp("model")
    reference_vae(TINY, seed=21).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight good PNGs of a few sizes (0.png ... 7.png)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(8):
        pixels = np.random.default_rng(i).integers(0, 256, (60 + 5 * i, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root
