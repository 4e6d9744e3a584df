"""Training under ``torchrun``: the process group and DDP/FSDP wrapping (``runtime``), per-rank data
(``sampler``), FSDP helpers (``fsdp``) and resumable checkpoints written by rank 0 (``resume``)."""
