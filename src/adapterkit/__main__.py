"""``python -m adapterkit``: the ``adapterkit`` command, so that ``torchrun ... -m adapterkit train`` works."""

import sys

from adapterkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
