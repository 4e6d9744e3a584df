"""Roles of a model's modules, inferred from its module tree, its config's head counts and the shapes.

Nothing here is keyed by ``model_type``. What is read:

* **attention**: a module whose children include a query, key and value projection (or one fused
  projection whose output is ``(H + 2 * KV) * d`` wide for the config's ``H`` query heads, ``KV``
  key/value heads and head size ``d = o_in / H``), plus the output projection beside them or, BERT
  style, in a sibling module (``attention.self.query`` ... ``attention.output.dense``). A path
  component such as ``cross`` / ``encoder_attn`` (or ``is_cross_attention``) marks cross-attention;
  sites under ``get_encoder()`` of an encoder-decoder model are the encoder's.
* **layers**: the outermost numbered module above an attention (``model.layers.3``, ``encoder.block.0``).
* **feed-forward**: in each layer, outside its attention, the linear layers ``down: (d_ff -> h)`` and
  ``up / gate: (h -> d_ff)`` (or ``h -> 2 d_ff`` fused), ``h`` being the attention's input width. Their
  lowest common module is the block (``mlp``, ``DenseReluDense``); when that is the layer itself the
  feed-forward is computed inline (BART's ``fc1 -> act -> fc2``), unless the down projection sits in a
  BERT-style output block that takes the residual as its second argument.
* **experts**: 3-D parameters (transformers 5 keeps all experts of a layer in one ``(E, ., .)`` tensor);
  **routers**: the modules beside them with a ``(E, h)`` weight.
* **norms**, the **input embedding** (``get_input_embeddings``), the **output head** (``get_output_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .modules import (
    is_linear_like,
    is_norm_layer,
    linear_dims,
    original_modules,
    residual_input_arg,
    unwrapped,
)
from .vocabulary import CROSS, FUSED_QKV, GATE_NAMES, GATE_PARTNER, GATE_PARTS, KEY, OUTPUT, QUERY, VALUE


@dataclass(frozen=True)
class AttentionSite:
    """One attention module: where its projections are (paths in the unwrapped model).

    Attributes:
        path: the module holding the query/key/value projections.
        q, k, v: separate projections (``None`` where fused).
        qkv: the fused projection (``None`` where separate).
        o: the output projection (``None`` when not found).
        cross: keys and values read another sequence (decoder cross-attention).
        encoder: inside the encoder of an encoder-decoder model.
        layer: the numbered layer holding it (``None`` outside one).
    """

    path: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str | None
    cross: bool
    encoder: bool
    layer: str | None


@dataclass(frozen=True)
class FeedForwardSite:
    """One feed-forward block: ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``.

    Attributes:
        layer: the numbered layer holding it.
        up, gate: input projections (``gate`` empty for an ungated block).
        down: the output projection (``None`` for a mixture-of-experts block).
        block: the module computing the block (``None``: computed inline in the layer's forward).
        residual_arg: where ``block`` is a BERT-style output block ``f(h, residual)``, the index of ``residual``.
        experts: a mixture-of-experts block's 3-D expert parameters (its ``block`` holds router and experts).
    """

    layer: str | None
    up: tuple[str, ...]
    gate: tuple[str, ...]
    down: str | None
    block: str | None
    residual_arg: int | None = None
    experts: tuple[str, ...] = ()


@dataclass
class ModelRoles:
    """What :func:`infer_roles` found; ``notes[role]`` says why a role has no module."""

    attention: list[AttentionSite] = field(default_factory=list)
    feed_forward: list[FeedForwardSite] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    input_embedding: str | None = None
    output_head: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)


def text_config(model: nn.Module) -> object | None:
    """The language part of a transformers config (``None`` for a plain module)."""
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_heads(model: nn.Module) -> int | None:
    """The config's number of query heads (``None`` when it has none)."""
    cfg = text_config(model)
    for name in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _projection(path: str, module: nn.Module, names: frozenset[str] | tuple[str, ...]) -> str | None:
    """The child of ``module`` named in ``names`` that is (or holds exactly one) linear layer."""
    kids = {name.lower(): name for name, _ in module.named_children()}
    for wanted in names:
        name = kids.get(wanted)
        if name is None:
            continue
        child = unwrapped(getattr(module, name))
        if is_linear_like(child):
            return f"{path}.{name}" if path else name
        inner = [(n, c) for n, c in child.named_children() if is_linear_like(unwrapped(c))]
        if len(inner) == 1 and len(list(child.children())) == 1:
            return f"{path}.{name}.{inner[0][0]}" if path else f"{name}.{inner[0][0]}"
    return None


def _output(mods: dict[str, nn.Module], path: str, width: int, taken: set[str]) -> str | None:
    """The output projection reading ``width`` features: a child of the attention, else in a sibling block."""
    def pick(owner: str) -> str | None:
        module = mods[owner]
        for name in OUTPUT:
            found = _projection(owner, module, (name,))
            if found and found not in taken and (linear_dims(mods[found]) or (0, 0))[0] == width:
                return found
        return None

    own = pick(path)
    if own or not path:
        return own
    parent = _parent(path)
    for name, _ in mods[parent].named_children():
        sibling = f"{parent}.{name}" if parent else name
        if sibling != path and sibling in mods:
            found = pick(sibling)
            if found:
                return found
    return None


def _fused_ok(model: nn.Module, module: nn.Module, qkv: nn.Module, o_in: int) -> bool:
    """A fused projection is ``(H + 2 KV) d`` wide with ``d = o_in / H``; state-space mixers (with a conv) are not."""
    heads = attention_heads(model)
    if heads is None or o_in % heads or any(isinstance(c, nn.Conv1d) for c in module.children()):
        return False
    d = o_in // heads
    extra = linear_dims(qkv)[1] - o_in  # type: ignore[index]
    return extra > 0 and extra % (2 * d) == 0 and heads % (extra // (2 * d)) == 0


def _layer_of(path: str) -> str | None:
    parts = path.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _encoder_prefix(model: nn.Module) -> str | None:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    getter = getattr(model, "get_encoder", None)
    encoder = getter() if callable(getter) else None
    return next((p for p, m in model.named_modules() if m is encoder), None)


def attention_sites(model: nn.Module, mods: dict[str, nn.Module]) -> list[AttentionSite]:
    """Every attention module of ``model`` (see the module docstring for the rules)."""
    encoder = _encoder_prefix(model)
    sites = []
    for path, module in mods.items():
        q, k, v = (_projection(path, module, names) for names in (QUERY, KEY, VALUE))
        qkv = None
        if q and k and v:
            width = linear_dims(mods[q])[1]  # type: ignore[index]
            o = _output(mods, path, width, {q, k, v})
        else:
            q = k = v = None
            qkv = _projection(path, module, FUSED_QKV)
            if qkv is None:
                continue
            o = _output(mods, path, linear_dims(mods[qkv])[0], {qkv})  # type: ignore[index]
            if o is None or not _fused_ok(model, module, mods[qkv], linear_dims(mods[o])[0]):  # type: ignore[index]
                continue
        lowered = path.lower().split(".")
        cross = bool(getattr(module, "is_cross_attention", False)) or any(c in part for part in lowered for c in CROSS)
        inside_encoder = encoder is not None and (path == encoder or path.startswith(encoder + ".") or encoder == "")
        sites.append(AttentionSite(path, q, k, v, qkv, o, cross, inside_encoder and not cross, _layer_of(path)))
    return sites


def _is_gate(name: str, siblings: set[str]) -> bool:
    name = name.lower()
    if "gate_up" in name:
        return False
    return any(part in name for part in GATE_PARTS) or (name in GATE_NAMES and GATE_PARTNER[name] in siblings)


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    return ".".join(common)


def _pairs(linears: dict[str, tuple[int, int]], hidden: int) -> dict[str, list[str]]:
    """``{down: [up, gate ...]}``: ``down (f -> hidden)`` with the ``hidden -> f`` (or ``2 f``) layers nearest to it."""
    downs = [p for p, (i, o) in linears.items() if o == hidden and i != hidden]
    ups: dict[str, list[str]] = {d: [] for d in downs}
    for p, (i, o) in linears.items():
        fits = [d for d in downs if i == hidden and o in (linears[d][0], 2 * linears[d][0]) and p != d]
        if fits:  # the down projection nearest in the tree
            ups[max(fits, key=lambda d: len(_common([p, d])))].append(p)
    return {d: u for d, u in ups.items() if u}


def _site(mods: dict[str, nn.Module], layer: str, down: str, ups: list[str], holds_attention: bool) -> FeedForwardSite:
    names = {p.rsplit(".", 1)[-1].lower() for p in ups}
    gate = tuple(p for p in ups if _is_gate(p.rsplit(".", 1)[-1], names))
    up = tuple(p for p in ups if p not in gate)
    block: str | None = _common([*ups, down])
    residual = None
    if block == layer and holds_attention:  # computed in the layer's own forward, beside its attention
        owner = _parent(down)
        residual = residual_input_arg(mods[owner]) if owner != layer else None
        block = owner if residual is not None else None
    return FeedForwardSite(layer, up, gate, down, block, residual)


def feed_forward_sites(mods: dict[str, nn.Module], sites: list[AttentionSite],
                       experts: list[str]) -> list[FeedForwardSite]:
    """The feed-forward blocks of every layer that holds an attention (see the module docstring).

    Layers holding expert parameters get one site for their mixture-of-experts block (the module
    above the experts) instead of sites for the dense parts inside it (shared experts).
    """
    hiddens = {linear_dims(mods[s.q or s.qkv])[0] for s in sites}  # type: ignore[index]
    skip = [s.path for s in sites] + [s.o for s in sites if s.o]
    linears = {p: linear_dims(m) for p, m in mods.items() if is_linear_like(m) and p
               and not any(p == s or p.startswith(s + ".") for s in skip)}
    moe_blocks: dict[str, list[str]] = {}
    for param in experts:
        block = _parent(_parent(param))
        moe_blocks.setdefault(block, []).append(param)
    found = [FeedForwardSite(_layer_of(b + ".x"), (), (), None, b, None, tuple(ps)) for b, ps in moe_blocks.items()]
    layers = list(dict.fromkeys(s.layer for s in sites if s.layer))
    for hidden in sorted(hiddens):
        for down, ups in _pairs({p: d for p, d in linears.items()  # type: ignore[misc]
                                 if not any(p.startswith(b + ".") for b in moe_blocks)}, hidden).items():
            layer = next((lay for lay in layers if down.startswith(lay + ".")), None) or _layer_of(down)
            if layer is not None:  # inside a stack of layers (not an embedding projection or a head)
                found.append(_site(mods, layer, down, ups, layer in layers))
    return found


def _experts_and_routers(mods: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    experts, routers = [], []
    for path, module in mods.items():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
        if not own:
            continue
        experts.extend(f"{path}.{n}" for n, _ in own)
        count = own[0][1].shape[0]
        owner = _parent(path)
        for other, candidate in mods.items():
            weight = getattr(candidate, "weight", None)
            if (other.startswith(owner + ".") and other != path and not other.startswith(path + ".")
                    and isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == count
                    and other not in routers):
                routers.append(other)
    return experts, routers


def _paths_of(model: nn.Module, getter_name: str) -> list[str]:
    getter = getattr(model, getter_name, None)
    target = getter() if callable(getter) else None
    if target is None:
        return []
    return [p for p, m in model.named_modules() if m is target and p]


def infer_roles(model: nn.Module) -> ModelRoles:
    """The roles of ``model``'s modules, read from its structure (see the module docstring)."""
    mods = original_modules(model)
    roles = ModelRoles()
    roles.attention = attention_sites(model, mods)
    roles.experts, roles.routers = _experts_and_routers(mods)
    roles.feed_forward = feed_forward_sites(mods, roles.attention, roles.experts)
    roles.norms = [p for p, m in mods.items() if p and is_norm_layer(m)]
    embedding = _paths_of(model, "get_input_embeddings")
    roles.input_embedding = embedding[0] if embedding else None
    roles.output_head = _paths_of(model, "get_output_embeddings")
    inline = [s for s in roles.feed_forward if s.block is None and s.down]
    if inline:
        site = inline[0]
        layer = type(mods[site.layer]).__name__
        roles.notes["ffn_block"] = (
            f"{layer} computes its feed-forward block inline ({', '.join(site.up + site.gate)} -> activation -> "
            f"{site.down} in the layer's forward), so no single module takes the block's input and returns its output")
    if not roles.attention:
        roles.notes["attention"] = ("no module holds query, key and value projections (separate, or one fused "
                                    "projection as wide as the config's heads say)")
    return roles
