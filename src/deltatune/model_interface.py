"""Which module of a model plays which role: the one place methods ask about an architecture.

Methods ask for *roles*, never module names; roles are read from the model's structure
(:mod:`deltatune.structure.infer`: module tree, config head counts, shapes), so any transformers
architecture whose attention and feed-forward follow the common patterns works without an entry
here. :func:`register_architecture` overrides roles where the structure is ambiguous (or a user
wants other defaults); nothing in a method package changes when an architecture is added.

Roles (:func:`role_paths` returns module paths of the unwrapped model; :func:`role_regex` a regex
matching exactly those paths, with layer numbers generalised):

* ``q`` / ``k`` / ``v``: query / key / value projections (a fused projection, GPT-2's ``c_attn``,
  plays all three; ``qkv`` lists fused ones only, :func:`fused_qkv_rows` splits their output rows);
* ``o``: attention output projections; ``attn_block``: the modules holding the projections
  (``self_attn`` / ``enc_self_attn`` / ``cross_attn``: decoder-or-encoder self-attention, the encoder's
  self-attention of an encoder-decoder model, cross-attention);
* ``up`` (with ``gate``), ``gate``, ``down``: feed-forward projections; ``ffn_block``: modules computing
  the whole feed-forward block ``FFN(x)`` (:func:`missing_role_reason` explains inline ones);
  ``ffn_out``: what returns the feed-forward output (the down projection; a mixture-of-experts block,
  whose experts are 3-D parameters, as a whole);
* ``norm``, ``embed`` (input embedding), ``head`` (output head), ``layer`` (numbered layers);
* ``experts``: 3-D expert *parameters* (``mlp.experts.gate_up_proj``), ``router``: their routers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError
from .structure import (
    ModelRoles,
    attention_heads,
    infer_roles,
    is_linear_like,
    is_norm_layer,
    linear_dims,
    original_modules,
    residual_input_arg,
)

ROLES = ("q", "k", "v", "qkv", "o", "attn_block", "self_attn", "enc_self_attn", "cross_attn", "up", "gate", "down",
         "ffn_out", "ffn_block", "norm", "embed", "head", "layer", "experts", "router")

#: Names under which task heads sit (trained in full and saved with the adapter for SEQ_CLS).
HEAD_NAMES: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score", "classification_head", "pre_classifier"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

#: How a fused query/key/value projection orders its output rows (default ``"concat"``: all query
#: rows, then all key rows, then all value rows). ``"per_head"``: ``(H, 3, d)``, each head's q, k, v
#: in turn. ``"grouped"``: ``(KV, H / KV + 2, d)``, each key/value group's queries, key, value.
FUSED_LAYOUTS = ("concat", "per_head", "grouped")


@dataclass
class ArchitectureOverride:
    """What :func:`register_architecture` recorded for one ``model_type``."""

    roles: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    fused_qkv_layout: str | None = None


_OVERRIDES: dict[str, ArchitectureOverride] = {}


def register_architecture(model_type: str, roles: dict[str, str] | None = None, missing: dict[str, str] | None = None,
                          fused_qkv_layout: str | None = None) -> None:
    """Override what structure inference finds for models of ``model_type`` (the config's ``model_type``).

    Args:
        roles: ``{role: regex}``; the role's modules become those whose path ends with a match
            (``{"q": "query", "v": "value"}``; ``"q_proj|wq"`` or ``r"attn\\.c_proj"`` work too).
        missing: ``{role: reason}`` for roles the architecture has no module for; methods quote it.
        fused_qkv_layout: row order of fused query/key/value projections (see :data:`FUSED_LAYOUTS`).

    Example::

        dt.register_architecture("my_model", roles={"q": "wq", "k": "wk", "v": "wv", "o": "wo"})
    """
    unknown = sorted(set(roles or {}) - set(ROLES))
    if unknown:
        raise ConfigError(f"register_architecture: unknown roles {unknown}; roles are {list(ROLES)}.")
    if fused_qkv_layout is not None and fused_qkv_layout not in FUSED_LAYOUTS:
        raise ConfigError(f"fused_qkv_layout must be one of {FUSED_LAYOUTS}; got {fused_qkv_layout!r}.")
    for role, pattern in (roles or {}).items():
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"register_architecture: the regex for role {role!r} ({pattern!r}) is invalid: {err}.") from err
    _OVERRIDES[model_type] = ArchitectureOverride(dict(roles or {}), dict(missing or {}), fused_qkv_layout)


# Where the structure cannot tell: fused projections whose rows interleave heads.
for _mtype in ("gpt_neox", "gpt_neox_japanese", "bloom", "persimmon", "deberta"):
    register_architecture(_mtype, fused_qkv_layout="per_head")
register_architecture("falcon", fused_qkv_layout="grouped")  # (KV, H / KV + 2, d): covers its MQA and per-head variants


def model_type(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` of ``model`` (``None`` for a plain ``nn.Module``)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def model_roles(model: nn.Module) -> ModelRoles:
    """Everything structure inference finds in ``model`` (overrides not applied; see :func:`role_paths`)."""
    return infer_roles(model)


def _inferred_paths(roles: ModelRoles, role: str) -> list[str]:
    att, ffn = roles.attention, roles.feed_forward
    by_role: dict[str, list[str | None]] = {
        "q": [s.q or s.qkv for s in att], "k": [s.k or s.qkv for s in att], "v": [s.v or s.qkv for s in att],
        "qkv": [s.qkv for s in att], "o": [s.o for s in att], "attn_block": [s.path for s in att],
        "self_attn": [s.path for s in att if not s.cross], "enc_self_attn": [s.path for s in att if s.encoder],
        "cross_attn": [s.path for s in att if s.cross],
        "up": [p for s in ffn for p in (*s.gate, *s.up)], "gate": [p for s in ffn for p in s.gate],
        "down": [s.down for s in ffn], "ffn_block": [s.block for s in ffn],
        "ffn_out": [s.down or s.block for s in ffn],
        "norm": list(roles.norms), "embed": [roles.input_embedding], "head": list(roles.output_head),
        "layer": [s.layer for s in att], "experts": list(roles.experts), "router": list(roles.routers),
    }
    return list(dict.fromkeys(p for p in by_role[role] if p))


def role_paths(model: nn.Module, role: str, roles: ModelRoles | None = None) -> list[str]:
    """Paths (in the unwrapped model) of the modules playing ``role`` (see the module docstring)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)}")
    override = _OVERRIDES.get(model_type(model) or "")
    if override and role in override.roles:
        pattern = re.compile(rf"(.*\.)?(?:{override.roles[role]})")
        return [p for p in original_modules(model) if p and pattern.fullmatch(p)]
    return _inferred_paths(roles or model_roles(model), role)


def _component_regex(path: str, generalise: int | None) -> str:
    r"""``path`` as a regex, numeric components generalised to ``\d+`` (all of them, or the first ``generalise``)."""
    parts, seen = [], 0
    for c in path.split("."):
        if c.isdigit() and (generalise is None or seen < generalise):
            parts.append(r"\d+")
            seen += 1
        else:
            parts.append(re.escape(c))
    return r"\.".join(parts)


def paths_regex(paths: list[str], all_paths: list[str] | None = None) -> str | None:
    r"""A regex full-matching exactly ``paths``, layer numbers generalised (``model\.layers\.\d+\.self_attn\.q_proj``).

    Numbers are generalised only as far as the regex then matches no other path of ``all_paths``
    (CTRL's ``ffn.2`` must not select ``ffn.0``); failing that the paths are listed one by one.
    """
    wanted = set(paths)
    for generalise in (None, 1, 0):
        unique = list(dict.fromkeys(_component_regex(p, generalise) for p in paths))
        if not unique:
            return None
        regex = "(?:" + "|".join(unique) + ")"
        if all_paths is None or {p for p in all_paths if re.fullmatch(regex, p)} == wanted:
            return regex
    return regex


def role_regex(model: nn.Module, roles: list[str]) -> str | None:
    """A full-match regex over module paths selecting ``roles`` of ``model`` (``None``: no such module)."""
    found = model_roles(model)
    paths = [p for role in roles for p in role_paths(model, role, found)]
    return paths_regex(paths, [p for p, _ in model.named_modules()])


def missing_role_reason(model: nn.Module, role: str) -> str | None:
    """Why ``model`` has no module for ``role`` (``None`` if it has one, or nothing is known)."""
    override = _OVERRIDES.get(model_type(model) or "")
    if override and role in override.missing:
        return override.missing[role]
    roles = model_roles(model)
    if role_paths(model, role, roles):
        return None
    return roles.notes.get(role) or roles.notes.get("attention")


def structure_summary(model: nn.Module) -> str:
    """One sentence on what inference found in ``model``: for errors that ask the user to name modules."""
    roles = model_roles(model)
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in original_modules(model).items() if p and is_linear_like(m)})
    found = (f"found {len(roles.attention)} attention module(s), {len(roles.feed_forward)} feed-forward block(s), "
             f"{len(roles.experts)} expert parameter(s)")
    why = f" ({roles.notes['attention']})" if "attention" in roles.notes else ""
    return f"{found}{why}; linear layer names: {linear[:20]}{' ...' if len(linear) > 20 else ''}"


def fused_qkv_rows(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """``{"q" | "k" | "v": output-row indices}`` of the fused projection at ``path``.

    Uses the config's ``H`` query heads and the row count ``(H + 2 KV) d`` (``d`` from the output
    projection's width ``H d``); the row order is ``"concat"`` unless :func:`register_architecture`
    says otherwise for the model type.
    """
    roles = model_roles(model)
    site = next((s for s in roles.attention if s.qkv == path), None)
    if site is None or site.o is None:
        raise ConfigError(f"{path} is not a fused query/key/value projection of {type(model).__name__}.")
    mods = original_modules(model)
    heads = attention_heads(model)
    if heads is None:
        raise ConfigError(f"{type(model).__name__}'s config names no number of attention heads.")
    width = linear_dims(mods[site.o])[0]  # type: ignore[index]
    d = width // heads
    kv = (linear_dims(mods[path])[1] - width) // (2 * d)  # type: ignore[index]
    override = _OVERRIDES.get(model_type(model) or "")
    layout = (override.fused_qkv_layout if override else None) or "concat"
    rows = torch.arange((heads + 2 * kv) * d)
    if layout == "concat":
        return {"q": rows[: heads * d], "k": rows[heads * d: (heads + kv) * d], "v": rows[(heads + kv) * d:]}
    group = heads // kv if layout == "grouped" else 1
    blocks = rows.view(kv if layout == "grouped" else heads, group + 2 if layout == "grouped" else 3, d)
    q_part = blocks[:, :group] if layout == "grouped" else blocks[:, :1]
    return {"q": q_part.reshape(-1), "k": blocks[:, -2].reshape(-1), "v": blocks[:, -1].reshape(-1)}


def output_head_paths(model: nn.Module) -> set[str]:
    """Module paths of the output head (the module holding the output embeddings), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def head_names(task_type: str | None) -> list[str]:
    """Head module names to train in full for ``task_type``."""
    return list(HEAD_NAMES.get(task_type or "", []))


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in a module path (``encoder.layer.3.attention`` -> 3), or ``None``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if patterns:
        for pattern in patterns:
            match = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", path)
            if match:
                return int(match.group(1))
        return None
    match = re.search(r"\.(\d+)(?:\.|$)", "." + path)
    return int(match.group(1)) if match else None


__all__ = [
    "FUSED_LAYOUTS", "HEAD_NAMES", "ROLES", "fused_qkv_rows", "head_names", "is_linear_like", "is_norm_layer",
    "layer_index", "linear_dims", "missing_role_reason", "model_roles", "model_type", "output_head_paths", "paths_regex",
    "register_architecture", "residual_input_arg", "role_paths", "role_regex", "structure_summary",
]
