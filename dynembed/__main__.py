"""``python -m dynembed``: the dynembed command line."""

import sys

from dynembed.cli import main

sys.exit(main())
