"""P-tuning's prompt encoders: ``(1, n, D) -> (1, n, D)`` (Liu et al., arXiv 2103.10385, section 3)."""

from __future__ import annotations

import torch
from torch import nn

from .config import PTuningConfig


def mlp_encoder(dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """``Linear(D, H) -> ReLU -> [Linear(H, H) -> ReLU] * (layers - 1) -> Linear(H, D)``."""
    modules: list[nn.Module] = []
    width = dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
        width = hidden
    modules.append(nn.Linear(width, dim))
    return nn.Sequential(*modules)


class LstmEncoder(nn.Module):
    """``h = MLP(BiLSTM(e))``: a bidirectional LSTM over the virtual tokens, then a two-layer MLP.

    Shapes: ``e (1, n, D) -> BiLSTM -> (1, n, 2H) -> Linear(2H, 2H) -> ReLU -> Linear(2H, D) -> (1, n, D)``.
    The LSTM lets every virtual token depend on its neighbours (the paper's motivation).
    """

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                                 bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table)[0])


def make_encoder(config: PTuningConfig) -> nn.Module:
    """The encoder ``config.encoder_reparameterization_type`` names (``config.token_dim`` is set)."""
    dim = int(config.token_dim or 0)
    hidden = config.encoder_hidden_size or dim
    if config.encoder_reparameterization_type == "LSTM":
        return LstmEncoder(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
    return mlp_encoder(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
