"""Training utilities: data sets, tokenisation, training loop and metrics. Depends on the core, never the reverse."""
