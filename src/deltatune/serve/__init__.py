"""``deltatune serve``: an OpenAI-compatible HTTP server for many adapters of one base model.

Built on top of the core (nothing in the core or the training loop imports it):

- :mod:`.protocol`     requests (pydantic) and responses in OpenAI's wire format
- :mod:`.errors`       HTTP status + OpenAI's JSON error body
- :mod:`.adapters`     which adapters are loaded; safe run-time load/unload from ``--adapters-dir``
- :mod:`.engine`       continuous batching: one forward per step for every running sequence
- :mod:`.batch_cache`  the left-padded key/value cache of the running sequences
- :mod:`.mixed_forward` first forwards and decoding steps whose rows use different adapters
- :mod:`.sampling`     greedy / temperature / top-p choice of the next token
- :mod:`.text`         generated ids -> streamed text, stop strings
- :mod:`.app`          the FastAPI routes, auth and limits
- :mod:`.server`       the command: build everything, run uvicorn, drain on SIGTERM

Needs the ``serve`` extra (``pip install deltatune[serve]``: fastapi, uvicorn, pydantic).
"""

from __future__ import annotations
