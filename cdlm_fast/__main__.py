"""``python -m cdlm_fast``: see :mod:`cdlm_fast.cli`."""
import sys

from .cli import main

sys.exit(main())
