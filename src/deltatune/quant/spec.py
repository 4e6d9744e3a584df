"""How one string names a quantization: ``"nf4"``, ``"int8"``, or a 4-bit kind with its block size, ``"nf4:32"``.

The fingerprint records this spelling and ``--quantize`` takes it; bitsandbytes' default block size (64
values per scale) is written plain. This module imports nothing of deltatune's, so the backends
(:mod:`.bnb`) and the converter (:mod:`.convert`) can both use it.
"""

from __future__ import annotations

#: bitsandbytes 4-bit block sizes (values per block scale) its kernels accept; 64 is its (and transformers') default.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BLOCKSIZE = 64
FOUR_BIT = ("nf4", "fp4")


def kind_spec(kind: str, blocksize: int | None) -> str:
    """The one-string name of a quantization: ``"nf4"`` at the default block size, ``"nf4:32"`` otherwise."""
    return kind if blocksize in (None, DEFAULT_BLOCKSIZE) else f"{kind}:{blocksize}"
