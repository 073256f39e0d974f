"""`python -m nnpatch`: the `nnpatch` command."""
import sys

from .cli import main

sys.exit(main())
