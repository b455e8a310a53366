"""``python -m gigpo_torchrl.train``: the same as ``gigpo-train``."""

import sys

from gigpo_torchrl.train.cli import main

sys.exit(main())
