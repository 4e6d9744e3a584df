"""How ``deltatune serve`` loads its one shared base, from ``--quantize`` or from the command-line adapters.

Every adapter on a server runs on the same frozen base, and each adapter's fingerprint says which base it was
trained on. So, as ``eval`` and ``generate`` do for their one adapter:

- without ``--quantize`` the base is quantized as the ``--adapter`` folders' bases were when they were trained
  (their fingerprints); adapters that disagree (one trained on nf4, one on a float base) cannot share a base,
  and the server refuses to start, naming them;
- a LoftQ run with ``loftq_iter > 1`` trains on a base of its own, ``Q_T``, saved beside its adapter
  (:data:`deltatune.train.loftq_base.LOFTQ_BASE_FILE`): when a command-line adapter carries one, the server's
  base becomes that ``Q_T`` (written into the quantized load as ``eval`` does), and every other adapter must
  have been trained on it too (the fingerprint check of each load says so otherwise).

Adapters loaded over HTTP never change the base: one that needs another base is refused by its fingerprint
check, with :func:`base_hint` saying why.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..quant.load import recorded_quantization
from ..train.loftq_base import LOFTQ_BASE_FILE, apply_loftq_base


def served_quantization(quantize: str | None, quantize_embeddings: bool,
                        adapters: list[tuple[str, Path]]) -> tuple[str | None, bool]:
    """``(kind, embeddings)`` to load the base with: ``--quantize`` when given, else what every command-line
    adapter's base was (``(None, False)``: float; also when no adapter is named)."""
    if quantize:
        return quantize, quantize_embeddings
    recorded = {name: recorded_quantization(folder) for name, folder in adapters}
    choices = set(recorded.values())
    if len(choices) > 1:
        described = ", ".join(f"{name}: {kind or 'float'}{' + embedding' if emb else ''}"
                              for name, (kind, emb) in recorded.items())
        raise ConfigError(f"The --adapter folders were trained on differently quantized bases ({described}); the "
                          "adapters of one server share one base. Serve them from separate servers, or pass "
                          "--quantize to choose the base (adapters trained on another one are then refused).")
    return choices.pop() if choices else (None, False)


def apply_adapter_base(base: nn.Module, adapters: list[tuple[str, Path]]) -> str | None:
    """Write the LoftQ base of the first command-line adapter that carries one into ``base``; returns its name
    (``None``: no adapter carries one, the base stays the plain load)."""
    for name, folder in adapters:
        if (Path(folder) / LOFTQ_BASE_FILE).is_file():
            apply_loftq_base(base, Path(folder))
            return name
    return None


def base_hint(folder: Path, base_from: str | None) -> str:
    """The reason an adapter's base fingerprint may differ from the server's, when the adapter's folder says it."""
    if (Path(folder) / LOFTQ_BASE_FILE).is_file():
        return (" It carries its own LoftQ base layers (LoftQ with loftq_iter > 1), and the adapters of one server "
                "share one base: serve it from a server started with it as --adapter (its base then becomes the "
                "server's), or merge it (deltatune merge --dtype float32) and serve the merged model.")
    if base_from is not None:
        return (f" This server's base carries adapter {base_from!r}'s LoftQ base layers; adapters trained on the "
                "plain quantized base need a server of their own.")
    return ""
