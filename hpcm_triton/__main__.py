"""``python -m hpcm_triton`` → the command line (see :mod:`hpcm_triton.cli`)."""
import sys

from .cli import main

sys.exit(main())
