"""``python -m async_ckpt.verify``: the command lives in :mod:`async_ckpt.tools.verify`."""

import sys

from .tools.verify import main

if __name__ == "__main__":
    sys.exit(main())
