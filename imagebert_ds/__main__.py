"""``python -m imagebert_ds``: the ``imagebert-ds`` console script."""
import sys

from imagebert_ds.cli import main

sys.exit(main())
