"""``python -m moe_empathy.cli``: the ``moe-empathy`` command."""

import sys

from . import main

sys.exit(main())
