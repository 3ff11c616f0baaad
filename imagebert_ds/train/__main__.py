"""Rank entry point: ``deepspeed --num_gpus N --module imagebert_ds.train --config X.yaml``.

Also runs as a plain single process (``python -m imagebert_ds.train``), under torchrun or srun.
The config is loaded and validated before the process group starts, so a bad config fails fast
on every rank with the key and the file named.
"""
import sys

from imagebert_ds.train.entry import rank_main

sys.exit(rank_main())
