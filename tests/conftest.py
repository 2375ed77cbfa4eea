"""Fixtures shared by the encode tests: a small random-weight VAE saved as a diffusers folder."""

from __future__ import annotations

import pytest
from reference import TINY, reference_vae


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A diffusers folder holding a small VAE (64 px sample size) with random weights."""
    path = tmp_path_factory.mktemp("model")
    reference_vae(TINY, seed=21).save_pretrained(path)
    return path
