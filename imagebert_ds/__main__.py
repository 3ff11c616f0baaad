import sys

from imagebert_ds.cli import main

sys.exit(main())
