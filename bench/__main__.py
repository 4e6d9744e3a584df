"""``python -m bench --suite quick|full``: see :mod:`bench.suite_cli`."""

from __future__ import annotations

import sys

from bench.suite_cli import main

sys.exit(main())
