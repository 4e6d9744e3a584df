"""OFT layer on linear layers (``nn.Linear``, transformers' ``Conv1D``): the input is rotated block by block.

    x: (..., in) -> (..., n, b);  x_i <- x_i R_i (row vectors);  h = base(x)

Merging folds the rotation into the weight, ``W <- W R^T`` (``nn.Linear``, ``(out, in)``) or
``W <- R W`` (``Conv1D``, ``(in, out)``), where ``R = diag(R_1, ..., R_n)``; unmerging solves it back
(``R`` from the truncated Cayley series is only nearly orthogonal, so no transpose shortcut).
Tensor names are HF peft's: ``<module>.oft_R.weight``. In a mixed-adapter batch each row is rotated by
its own adapter's ``R``, gathered from a stack in one batched matmul (:mod:`.batched`).

On ``nn.Conv2d`` (square kernel ``k``, no dilation, no groups: HF peft's limits) each filter, flattened to
``(in * k * k)`` in ``(channel, row, column)`` order, is rotated: ``h = conv(x, W R^T)`` with ``W`` seen as
``(out, in * k * k)``, which is also what merging writes. (HF peft 0.21's unmerged Conv2d forward
rotates unfolded input patches and folds them back, overlap-adding neighbours; for kernels larger
than 1x1 that is not the conv with its own merged weight. deltatune computes the merged form in both
states; for 1x1 kernels the two agree.)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...layer import DeltaLayer
from ...model_interface import is_linear_like, linear_dims
from ...routing import Routing, current_routing
from ...targeting import unwrapped
from .batched import routed_rotate, stack_rotations
from .config import OFTConfig
from .rotation import BlockRotation, cayley, constrain, skew


def nearest_divisor(features: int, wanted: int) -> int:
    """The divisor of ``features`` closest to ``wanted`` (ties go down); ``features`` when ``wanted`` exceeds it."""
    if wanted >= features:
        return features
    above = wanted
    while above <= features and features % above:
        above += 1
    below = wanted
    while below > 1 and features % below:
        below -= 1
    return below if wanted - below <= above - wanted else above


class OFTLinear(DeltaLayer):
    adapter_attr_names = ("oft_R",)
    method_name = "oft"
    routes_rows = True  # mixed-adapter batches: each row rotated by its own adapter (see .batched)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.transposed = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = self._dims(base)
        self.oft_R = nn.ModuleDict()
        self.blocks: dict[str, int] = {}
        self.options: dict[str, OFTConfig] = {}

    @staticmethod
    def _dims(base: nn.Module) -> tuple[int, int]:
        """(features the rotation acts on, output features)."""
        return linear_dims(base)

    def add(self, name: str, config: OFTConfig, path: str = "") -> None:
        size, n = config.oft_block_size, config.r
        if n == 0:
            if self.in_features % size:
                size = nearest_divisor(self.in_features, size)
                warnings.warn(f"oft_block_size={config.oft_block_size} does not divide {self.in_features} ({path}); "
                              f"using {size}.", stacklevel=2)
            n = self.in_features // size
        else:
            if self.in_features % n:
                n = nearest_divisor(self.in_features, n)
                warnings.warn(f"r={config.r} does not divide {self.in_features} ({path}); using {n}.", stacklevel=2)
            size = self.in_features // n
        rotation = BlockRotation(1 if config.block_share else n, size, init_zero=config.init_weights)
        self.oft_R[name] = rotation.to(self.get_base_layer().weight.device)
        self.blocks[name] = n
        self.options[name] = config

    def rotations(self, name: str) -> torch.Tensor:
        """The ``(n or 1, b, b)`` rotation blocks of adapter ``name`` (COFT projection applied first)."""
        module, config = self.oft_R[name], self.options[name]
        if config.coft:
            with torch.no_grad():
                module.weight.copy_(constrain(module.weight, module.block_size, config.eps))
        q = skew(module.weight, module.block_size)
        return cayley(q, config.use_cayley_neumann, config.num_cayley_neumann_terms)

    def _with_dropout(self, name: str, blocks: torch.Tensor) -> torch.Tensor:
        """Multiplicative dropout: ``int(p * n)`` random blocks become the identity while training."""
        p, n = self.options[name].module_dropout, blocks.shape[0]
        if not (self.training and p > 0 and n > 1):
            return blocks
        mask = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
        mask[torch.randperm(n, device=blocks.device)[: int(p * n)]] = 1
        eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
        return (1 - mask)[:, None, None] * blocks + mask[:, None, None] * eye

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        blocks = self._with_dropout(name, self.rotations(name))  # (n or 1, b, b)
        n = self.blocks[name]
        if blocks.shape[0] == 1 and n > 1:
            blocks = blocks.expand(n, -1, -1)
        parts = x.to(blocks.dtype).reshape(-1, n, blocks.shape[-1]).transpose(0, 1)  # (n, tokens, b), a view
        return torch.bmm(parts, blocks).transpose(0, 1).reshape(x.shape).to(x.dtype)  # x_i R_i per block

    def _rotation_stack(self, names: Sequence[str]) -> torch.Tensor:
        """The adapters' rotations at their common block size plus an identity slot: ``(K+1, m, c, c)``."""
        return stack_rotations([self._with_dropout(n, self.rotations(n)) for n in names],
                               [self.blocks[n] for n in names])

    def _routed_input(self, routing: Routing, x: torch.Tensor) -> torch.Tensor:
        """``x`` with each row rotated by its own adapter (none for the base model's rows)."""
        names, uniform = self.routed_names(routing)
        if not names:
            return x
        if uniform:
            return self.rotate(names[0], x)
        slots = routing.slots(names, x.shape[0], x.device)  # (B,)
        dropout = self.training and any(self.options[n].module_dropout > 0 for n in names)
        stack = self._rotation_stack(names) if dropout else self.stacked(names, self._rotation_stack)
        return routed_rotate(stack, slots, x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        routing = None if self.disabled else current_routing()
        if routing is not None:
            return self.base_layer(self._routed_input(routing, x), *args, **kwargs)
        if not self.disabled:
            for name in self.active_adapters:
                if name not in self.merged_adapters:
                    x = self.rotate(name, x)
        return self.base_layer(x, *args, **kwargs)

    def full_rotation(self, name: str) -> torch.Tensor:
        """``R = diag(R_1, ..., R_n)``: ``(in, in)``."""
        blocks = self.rotations(name).detach().float()
        n = self.blocks[name]
        return torch.block_diag(*(blocks[0] for _ in range(n))) if blocks.shape[0] == 1 else torch.block_diag(*blocks)

    def merge_one(self, name: str) -> None:
        weight = self.get_base_layer().weight
        rot = self.full_rotation(name)
        merged = rot @ weight.float() if self.transposed else weight.float() @ rot.T
        weight.data.copy_(merged.to(weight.dtype))

    def unmerge_one(self, name: str) -> None:
        weight = self.get_base_layer().weight
        rot = self.full_rotation(name)
        if self.transposed:  # W' = R W
            original = torch.linalg.solve(rot, weight.float())
        else:  # W' = W R^T
            original = torch.linalg.solve(rot.T, weight.float(), left=False)
        weight.data.copy_(original.to(weight.dtype))

    def delete(self, name: str) -> None:
        super().delete(name)
        self.blocks.pop(name, None)
        self.options.pop(name, None)


class OFTConv2d(OFTLinear):
    """OFT on ``nn.Conv2d``: every filter ``(in, k, k)``, flattened, is rotated by ``R``: ``W <- W R^T``.

    Rows of a mixed-adapter batch are not routed here (the core refuses such batches with a clear error).
    """

    routes_rows = False

    @staticmethod
    def _dims(base: nn.Module) -> tuple[int, int]:
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels

    def rotated_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W R^T`` for ``weight`` ``(out, in * k * k)`` (module dropout applied while training)."""
        blocks = self._with_dropout(name, self.rotations(name))  # (n or 1, b, b)
        n = self.blocks[name]
        if blocks.shape[0] == 1 and n > 1:
            blocks = blocks.expand(n, -1, -1)
        parts = weight.to(blocks.dtype).reshape(weight.shape[0], n, blocks.shape[-1])  # (out, n, b)
        return torch.einsum("onk,nck->onc", parts, blocks).reshape(weight.shape)  # row i of block: sum_k W R[c, k]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        base = self.get_base_layer()
        pending = [] if self.disabled else [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return base(x, *args, **kwargs)
        weight = base.weight.reshape(self.out_features, -1)  # (out, in * k * k)
        for name in pending:
            weight = self.rotated_weight(name, weight)
        return base._conv_forward(x, weight.reshape(base.weight.shape).to(base.weight.dtype), base.bias)

    def merge_one(self, name: str) -> None:
        weight = self.get_base_layer().weight
        flat = weight.float().reshape(self.out_features, -1)  # (out, in * k * k)
        weight.data.copy_((flat @ self.full_rotation(name).T).reshape(weight.shape).to(weight.dtype))

    def unmerge_one(self, name: str) -> None:
        weight = self.get_base_layer().weight
        flat = weight.float().reshape(self.out_features, -1)
        original = torch.linalg.solve(self.full_rotation(name).T, flat, left=False)
        weight.data.copy_(original.reshape(weight.shape).to(weight.dtype))


def can_wrap(module: nn.Module, config: OFTConfig, path: str) -> str | None:
    """``None`` when OFT can wrap ``module``, else why not."""
    base = unwrapped(module)
    if isinstance(base, nn.Conv2d):
        if base.kernel_size[0] != base.kernel_size[1] or base.dilation != (1, 1) or base.groups != 1:
            return (f"nn.Conv2d with kernel {base.kernel_size}, dilation {base.dilation}, groups {base.groups} is not "
                    "supported (OFT rotates square, undilated, ungrouped filters, as HF peft)")
        return None
    if is_linear_like(base):
        return None
    return f"{type(base).__name__} is not supported (OFT wraps nn.Linear, Conv1D and nn.Conv2d)"


def make_oft_layer(module: nn.Module, config: OFTConfig, name: str, path: str) -> OFTLinear | None:
    """Wrap a linear or 2-D convolution ``module`` with OFT, or ``None`` for other module types."""
    if can_wrap(module, config, path) is not None:
        return None
    layer_cls = OFTConv2d if isinstance(unwrapped(module), nn.Conv2d) else OFTLinear
    return layer_cls.wrapping(module, name, config, path)


__all__ = ["OFTConv2d", "OFTLinear", "can_wrap", "make_oft_layer", "nearest_divisor"]
