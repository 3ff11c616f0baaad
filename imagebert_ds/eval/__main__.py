"""Rank entry point of ``imagebert-ds evaluate --nproc N``: ``python -m imagebert_ds.eval ARGS``
(also runs as one plain process, or under torchrun / srun)."""
import sys

from imagebert_ds.eval.cli import rank_main

sys.exit(rank_main())
