"""``python -m qmetrics`` (and ``torchrun -m qmetrics``): the ``qmetrics`` command."""

import sys

from qmetrics.cli import main

sys.exit(main())
