"""``python -m async_ckpt.fix``: the command lives in :mod:`async_ckpt.tools.fix`."""

import sys

from .tools.fix import main

if __name__ == "__main__":
    sys.exit(main())
