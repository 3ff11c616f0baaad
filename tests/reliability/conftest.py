"""Fixtures of the reliability tests: small toy data and a copy with broken samples/shards."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # rel_helpers


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    from imagebert_ds.data.toy import make_toy_data

    d = tmp_path_factory.mktemp("rel_toy")
    make_toy_data(d, train=64, test=8, seed=3)
    return d


@pytest.fixture(scope="session")
def toy_source(toy_root) -> Path:
    return toy_root / "stage1_web"


@pytest.fixture(scope="session")
def bad_source(toy_source, tmp_path_factory) -> tuple[Path, dict]:
    """The toy source with broken samples, an empty tar and a truncated one
    (``rel_helpers.make_bad_source``): (directory, {broken key: the loader's reason})."""
    from rel_helpers import make_bad_source

    d = tmp_path_factory.mktemp("rel_bad") / "src"
    return d, make_bad_source(toy_source, d)
