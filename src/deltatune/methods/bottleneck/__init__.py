"""Bottleneck adapters: Houlsby (arXiv 1902.00751), Pfeiffer (arXiv 2005.00247), parallel (He et al., arXiv 2110.04366).

    a(h) = s * W_up f(W_down h),   W_down: (b, d),  W_up: (d, b),  b = bottleneck_size
    houlsby / pfeiffer:  y = M(x) + a(M(x))     parallel:  y = FFN(x) + a(x)

Trains ``W_down``, ``W_up`` and their biases (``adapter_down``, ``adapter_up``); the model stays
frozen. ``W_up`` starts at zero, so the wrapped model starts exactly equal to the base. Placement
comes from :mod:`deltatune.model_interface` (roles): Houlsby wraps the attention output projection
(``o``) and the feed-forward output (``ffn_out``: the down projection, or a mixture-of-experts block as
a whole) of every layer, Pfeiffer only the latter, parallel sits beside the feed-forward block
(``ffn_block``; where the layer computes it inline, BART-style, the adapter wraps the down projection
and reads the up projection's input, see :mod:`.inline`). Adapters are inserted by wrapping those
modules; no transformers forward code is copied. Where an architecture has no module for the
placement, a clear error says so.

Not mergeable: the non-linearity keeps the adapter out of any weight matrix, so ``merge_adapter``
raises :class:`~deltatune.errors.MergeError`. HF peft has no bottleneck adapters; deltatune saves
them in the same layout (``adapter_config.json`` + ``adapter_model.safetensors``) with its own
``peft_type: "BOTTLENECK"`` and tensors ``base_model.model.<module>.adapter_down.weight`` (and
``.bias``, ``adapter_up.*``). See docs/methods.md.
"""

from __future__ import annotations

from torch import nn

from ...errors import TargetError
from ...model_interface import missing_role_reason, model_type, paths_regex, role_paths, role_regex
from ...registry import MethodSpec, register
from .config import BottleneckConfig
from .inline import connect_inputs, inline_sites
from .layer import BottleneckLayer, can_wrap

#: Roles of :mod:`deltatune.model_interface` each variant wraps by default.
VARIANT_ROLES: dict[str, list[str]] = {"houlsby": ["o", "ffn_out"], "pfeiffer": ["ffn_out"], "parallel": ["ffn_block"]}


def default_targets(model: nn.Module, config: BottleneckConfig) -> str | None:
    """Where the variant puts its adapters on this architecture (``None`` when it is unknown)."""
    return role_regex(model, VARIANT_ROLES[config.variant])


def prepare_config(model: nn.Module, config: BottleneckConfig) -> None:
    """Resolve the default placement (saved with the adapter); explain architectures that lack it.

    Parallel adapters beside a feed-forward block computed inline wrap its down projection and read
    the up projection's input (:mod:`.inline`; the pairs go to ``parallel_inputs``).
    """
    if config.target_modules is not None:
        return
    if config.variant == "parallel":
        inline = inline_sites(model)
        blocks = role_paths(model, "ffn_block")
        if inline or blocks:
            config.parallel_inputs = inline or None
            config.target_modules = paths_regex([*blocks, *inline], [p for p, _ in model.named_modules()])
            return
    for role in VARIANT_ROLES[config.variant]:
        reason = missing_role_reason(model, role)
        if reason:
            raise TargetError(
                f"bottleneck variant={config.variant!r} has no default placement on {type(model).__name__} "
                f"(model_type={model_type(model)!r}): {reason}. Use variant='houlsby' or 'pfeiffer', or pass "
                "target_modules naming the modules to put parallel adapters beside."
            )
    config.target_modules = default_targets(model, config)


SPEC = register(
    MethodSpec(
        name="bottleneck",
        peft_type=BottleneckConfig.PEFT_TYPE,
        config_cls=BottleneckConfig,
        kind="layer",
        layer_cls=BottleneckLayer,
        default_targets=default_targets,
        mergeable=False,
        prepare_config=prepare_config,
        can_wrap=can_wrap,
        finish_injection=connect_inputs,
    )
)

__all__ = ["SPEC", "VARIANT_ROLES", "BottleneckConfig", "BottleneckLayer"]
