"""``python -m qmetrics.cli``: the ``qmetrics`` command."""

import sys

from qmetrics.cli import main

sys.exit(main())
