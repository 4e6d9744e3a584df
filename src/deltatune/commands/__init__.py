"""What the ``deltatune`` commands do, as plain functions the CLI calls: ``inference`` (eval, predict,
generate, merge, inspect) and ``demo``. Training itself lives in :mod:`deltatune.train`."""
