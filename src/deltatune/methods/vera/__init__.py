"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort and Asano, arXiv 2310.11454).

    h = W x + Lambda_b B Lambda_d A x,   A: (r, in), B: (out, r) frozen random, shared by all layers;
                                         Lambda_d = diag(d): d (r,), Lambda_b = diag(b): b (out,) trained

Only ``d`` and ``b`` train (``r + out`` numbers per layer). ``A`` and ``B`` are drawn once per adapter
from ``projection_prng_key`` at the largest input/output size among the targets; each layer reads
their top-left block. Mergeable: ``W <- W + diag(b) B diag(d) A``. Files are HF peft's ``VERA``:
``<module>.vera_lambda_b`` / ``.vera_lambda_d`` plus, with ``save_projection``, the shared
``base_model.vera_A`` / ``base_model.vera_B``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import TargetError
from ...inject import iter_wrappers
from ...model_interface import linear_dims, role_regex
from ...registry import MethodSpec, register
from ...targeting import find_targets, unwrapped
from .config import VeraConfig
from .layer import VeraLinear, can_wrap, make_projections


def default_targets(model: nn.Module, config: VeraConfig) -> str | None:
    """Query and value projections of the attention."""
    return role_regex(model, ["q", "v"])


def prepare_config(model: nn.Module, config: VeraConfig) -> None:
    """Draw this adapter's shared projections at the largest target size and attach them to its config
    (a private attribute, not a field: it is never written to ``adapter_config.json``)."""
    wanted = config.target_modules if config.target_modules is not None else default_targets(model, config)
    if wanted is None:
        return  # inject_layers says that there is no default for this architecture
    try:
        targets = [unwrapped(t.module) for t in find_targets(model, config, wanted)]
    except TargetError:
        return  # inject_layers raises the same error with its full message
    dims = [linear_dims(m) for m in targets if can_wrap(m, config, "") is None]
    if not dims:
        return
    in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
    a, b = make_projections(config.projection_prng_key, config.r, out_max, in_max)
    device = next(m.weight.device for m in targets if can_wrap(m, config, "") is None)
    config.fan_in_fan_out = any(not isinstance(m, nn.Linear) for m in targets if can_wrap(m, config, "") is None)
    object.__setattr__(config, "_vera_projections", (a.to(device), b.to(device)))


def shared_state(config: VeraConfig, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``base_model.vera_A`` / ``base_model.vera_B`` (HF peft's keys) when ``save_projection`` is on."""
    if not config.save_projection:
        return {}
    for _, wrapper in iter_wrappers(model):
        if isinstance(wrapper, VeraLinear) and name in wrapper.vera_projections:
            proj = wrapper.vera_projections[name]
            return {"base_model.vera_A": proj.A, "base_model.vera_B": proj.B}
    return {}


SPEC = register(
    MethodSpec(
        name="vera",
        peft_type=VeraConfig.PEFT_TYPE,
        config_cls=VeraConfig,
        kind="layer",
        layer_cls=VeraLinear,
        default_targets=default_targets,
        mergeable=True,
        can_wrap=can_wrap,
        prepare_config=prepare_config,
        shared_state=shared_state,
    )
)

__all__ = ["SPEC", "VeraConfig", "VeraLinear"]
