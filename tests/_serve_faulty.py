"""``deltatune serve`` with an injected fault: any decoding step whose batch holds adapter ``boom`` raises.

Used by tests/test_serve.py to check that a failing request gets a 500 while the requests decoded in
the same batch go on. Run as ``python _serve_faulty.py serve ARGS...``.
"""

from __future__ import annotations

import sys
from typing import Any

from deltatune.cli import main
from deltatune.serve import engine

_real_step_rows = engine.step_rows


def _step_rows_failing_for_boom(model: Any, names: Any, inputs: Any, tensors: Any) -> Any:
    if "boom" in names:  # decoding steps only: the prefill works
        raise RuntimeError("injected fault for adapter boom")
    return _real_step_rows(model, names, inputs, tensors)


engine.step_rows = _step_rows_failing_for_boom

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
