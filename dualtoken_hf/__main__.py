"""`python -m dualtoken_hf ...` runs the `dualtoken` command line."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
