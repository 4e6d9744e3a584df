"""OFT's rotation blocks and block-wise rotation against formulas written here.

* ``cayley`` with the truncated Neumann series equals ``I + 2 Q + ... + 2 Q^(k-2) + Q^(k-1)`` for every
  number of terms ``k`` (the short cases as documented), and its gradient equals plain autograd's
  through that sum (float64): the partial sums are accumulated in place.
* ``skew`` / ``upper_entries`` invert each other and give ``S - S^T``.
* ``OFTLinear.rotate`` equals ``x`` times the block-diagonal ``R`` (``torch.block_diag``), shared blocks too.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.oft.rotation import cayley, skew, upper_entries


def _series(q: torch.Tensor, terms: int) -> torch.Tensor:
    """The documented truncation, term by term (``k = 3`` is the ``k = 4`` series)."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    if terms == 1:
        return eye
    if terms == 2:
        return eye + 2 * q
    k = max(terms, 4)
    powers = [torch.linalg.matrix_power(q, i) for i in range(1, k)]  # Q^1 .. Q^(k-1)
    return eye + 2 * sum(powers[:-1]) + powers[-1]


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 7])
def test_neumann_cayley_equals_the_series_and_its_gradient(terms: int) -> None:
    g = torch.Generator().manual_seed(terms)
    vec = (0.3 * torch.randn(3, 10, dtype=torch.float64, generator=g)).requires_grad_()  # 3 blocks of 5 x 5
    upstream = torch.randn(3, 5, 5, dtype=torch.float64, generator=g)
    ours = cayley(skew(vec, 5), True, terms)
    want = _series(skew(vec, 5), terms)
    torch.testing.assert_close(ours, want, atol=1e-12, rtol=0)
    if terms > 1:
        mine = torch.autograd.grad((ours * upstream).sum(), vec)[0]
        plain = torch.autograd.grad((want * upstream).sum(), vec)[0]
        torch.testing.assert_close(mine, plain, atol=1e-12, rtol=0)


def test_skew_and_upper_entries() -> None:
    vec = torch.arange(1.0, 7.0).reshape(1, 6)  # one 4 x 4 block
    q = skew(vec, 4)
    expected = torch.tensor([[0.0, 1, 2, 3], [-1, 0, 4, 5], [-2, -4, 0, 6], [-3, -5, -6, 0]])
    torch.testing.assert_close(q[0], expected)
    torch.testing.assert_close(upper_entries(q), vec)


@pytest.mark.parametrize("options", [{"oft_block_size": 4}, {"r": 2, "oft_block_size": 0, "block_share": True}])
def test_rotate_equals_the_block_diagonal_matrix(make_model, options) -> None:
    model = dt.get_delta_model(make_model("llama_lm"), dt.OFTConfig(init_weights=False, target_modules=["q_proj"], **options))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    blocks = layer.rotations("default")  # (n or 1, b, b)
    n = layer.blocks["default"]
    full = torch.block_diag(*(blocks[0 if blocks.shape[0] == 1 else i] for i in range(n)))  # (in, in)
    torch.testing.assert_close(layer.rotate("default", x), x @ full, atol=1e-6, rtol=1e-6)
