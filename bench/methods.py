"""The methods under test and how each library builds them, with one set of hyper-parameters each.

Every method has one learning rate and one config, used unchanged for deltatune and for HF peft, so a
difference between the two libraries is a difference of implementation only. Methods a library lacks
(or that are not installed yet in deltatune) are reported as unavailable, never silently skipped.

Settings (MiniLM, a 6-layer BERT, hidden size 384):

=========  ======================================================================  ==========
method     config                                                                  lr
=========  ======================================================================  ==========
full       every weight trains                                                     1e-4
head       only the classifier head trains                                         2e-2
lora       r=8, alpha=16, dropout 0.1 on query/value (Hu et al., arXiv 2106.09685)  3e-3
dora       the same with weight decomposition (Liu et al., arXiv 2402.09353)        3e-3
ia3        key, value, both output.dense (input-scaled) (Liu et al., 2205.05638)     2e-2
houlsby    bottleneck adapters after attention and FFN, reduction 16 (1902.00751)   3e-3
pfeiffer   one bottleneck adapter after the FFN, reduction 16 (arXiv 2005.00247)     3e-3
parallel   parallel adapter beside the FFN, scaling 4, reduction 16 (arXiv 2110.04366)  1e-3
prefix     20 key/value prefixes per layer (Li & Liang, arXiv 2101.00190)           3e-2
prompt     20 virtual tokens (Lester et al., arXiv 2104.08691)                       1e-1
ptuning    20 virtual tokens through an MLP encoder, hidden 128 (arXiv 2103.10385)   3e-2
bitfit     every bias of the encoder (Ben Zaken et al., arXiv 2106.10199)            5e-3 *
lntuning   every LayerNorm's scale and shift (Zhao et al., arXiv 2312.11420)         5e-3 *
loha       r=8, alpha=16 on query/value (Hyeon-Woo et al., arXiv 2108.06098)         3e-3 *
lokr       r=8, alpha=16 on query/value (Yeh et al., arXiv 2212.10650)               3e-3 *
vera       r=256 shared projections, query/value (Kopiczko et al., 2310.11454)      1e-2 *
oft        block size 32 on query/value (Qiu et al., arXiv 2306.07280)               3e-3 *
adalora    init_r=12 -> target_r=8, alpha 16, query/value, deltaT 10 (2303.10512)   3e-3 *
=========  ======================================================================  ==========

``*``: not swept yet; each rate was set by analogy with the swept ones (LoRA-like factor methods at
LoRA's rate, vector-only methods at IA3's scale) and is shared by both libraries.

For sequence classification every PEFT method also trains the classifier head (both libraries do
so by default for ``task_type="SEQ_CLS"``). The rates were picked on TREC's validation split with
``python -m bench.sweep`` (see ``bench/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

LIBS = ("deltatune", "peft")


@dataclass(frozen=True)
class MethodDef:
    """One benchmarked method.

    Attributes:
        name: key used on the command line and in result files.
        label: human-readable name for tables.
        lr: learning rate (AdamW), shared by both libraries.
        kind: ``"full"``, ``"head"`` (no adapter library involved), or ``"peft"`` (an adapter method).
        dt: builds the deltatune config from ``task_type``; raises ``AttributeError`` while the method
            has not landed in deltatune.
        hf: builds the HF peft config from ``task_type``, or ``None`` when peft lacks the method.
    """

    name: str
    label: str
    lr: float
    kind: str = "peft"
    dt: Callable[[str], Any] | None = None
    hf: Callable[[str], Any] | None = None


QV = ["query", "value"]
LLAMA_QV = ["q_proj", "v_proj"]
IA3_TARGETS = ["key", "value", "output.dense"]
IA3_FF = ["output.dense"]


def _dt() -> Any:
    import deltatune

    return deltatune


def _hf() -> Any:
    import peft

    return peft


def _lora_targets(task_type: str) -> list[str]:
    return LLAMA_QV if task_type == "CAUSAL_LM" else QV


def _adalora(lib: Callable[[], Any]) -> Callable[[str], Any]:
    """AdaLoRA with its budget schedule over the whole run (the harness sets ``total_step`` to the run's
    length before training; peft needs a value at construction, so 1 stands in until then)."""
    return lambda t: lib().AdaLoraConfig(task_type=t, init_r=12, target_r=8, lora_alpha=16, target_modules=QV,
                                         tinit=0, tfinal=0, deltaT=10, total_step=1 if lib is _hf else None)


def _both(name: str, label: str, lr: float, cls: str, **options: Any) -> MethodDef:
    """A method both libraries have under the same config class name and options."""
    return MethodDef(name, label, lr, dt=lambda t: getattr(_dt(), cls)(task_type=t, **options),
                     hf=lambda t: getattr(_hf(), cls)(task_type=t, **options))


def _bottleneck(variant: str, scaling: float = 1.0) -> Callable[[str], Any]:
    return lambda t: _dt().BottleneckConfig(task_type=t, variant=variant, reduction_factor=16, scaling=scaling)


METHODS: dict[str, MethodDef] = {
    m.name: m
    for m in (
        MethodDef("full", "Full fine-tuning", 1e-4, kind="full"),
        MethodDef("head", "Head only", 2e-2, kind="head"),
        MethodDef(
            "lora", "LoRA r=8 (q,v)", 3e-3,
            dt=lambda t: _dt().LoraConfig(task_type=t, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=_lora_targets(t)),
            hf=lambda t: _hf().LoraConfig(task_type=t, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=_lora_targets(t)),
        ),
        MethodDef(
            "dora", "DoRA r=8 (q,v)", 3e-3,
            dt=lambda t: _dt().LoraConfig(task_type=t, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=QV, use_dora=True),
            hf=lambda t: _hf().LoraConfig(task_type=t, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=QV, use_dora=True),
        ),
        MethodDef(
            "ia3", "IA3 (k,v,ff)", 2e-2,
            dt=lambda t: _dt().IA3Config(task_type=t, target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
            hf=lambda t: _hf().IA3Config(task_type=t, target_modules=IA3_TARGETS, feedforward_modules=IA3_FF),
        ),
        MethodDef("houlsby", "Houlsby adapter (rf 16)", 3e-3, dt=_bottleneck("houlsby")),
        MethodDef("pfeiffer", "Pfeiffer adapter (rf 16)", 3e-3, dt=_bottleneck("pfeiffer")),
        MethodDef("parallel", "Parallel adapter (rf 16)", 1e-3, dt=_bottleneck("parallel", 4.0)),
        MethodDef(
            "prefix", "Prefix tuning (20)", 3e-2,
            dt=lambda t: _dt().PrefixTuningConfig(task_type=t, num_virtual_tokens=20),
            hf=lambda t: _hf().PrefixTuningConfig(task_type=t, num_virtual_tokens=20),
        ),
        MethodDef(
            "prompt", "Prompt tuning (20)", 1e-1,
            dt=lambda t: _dt().PromptTuningConfig(task_type=t, num_virtual_tokens=20),
            hf=lambda t: _hf().PromptTuningConfig(task_type=t, num_virtual_tokens=20),
        ),
        MethodDef(
            "ptuning", "P-tuning (20, MLP 128)", 3e-2,
            dt=lambda t: _dt().PTuningConfig(task_type=t, num_virtual_tokens=20, encoder_hidden_size=128),
            hf=lambda t: _hf().PromptEncoderConfig(task_type=t, num_virtual_tokens=20, encoder_hidden_size=128),
        ),
        MethodDef("bitfit", "BitFit (all biases)", 5e-3, dt=lambda t: _dt().BitFitConfig(task_type=t)),
        _both("lntuning", "LayerNorm tuning", 5e-3, "LNTuningConfig", target_modules=["LayerNorm"]),
        _both("loha", "LoHa r=8 (q,v)", 3e-3, "LoHaConfig", r=8, alpha=16, target_modules=QV),
        _both("lokr", "LoKr r=8 (q,v)", 3e-3, "LoKrConfig", r=8, alpha=16, target_modules=QV),
        _both("vera", "VeRA r=256 (q,v)", 1e-2, "VeraConfig", r=256, target_modules=QV),
        _both("oft", "OFT block 32 (q,v)", 3e-3, "OFTConfig", oft_block_size=32, target_modules=QV),
        MethodDef("adalora", "AdaLoRA 12->8 (q,v)", 3e-3, dt=_adalora(_dt), hf=_adalora(_hf)),
    )
}


def available(name: str, lib: str, task_type: str = "SEQ_CLS") -> str | None:
    """``None`` when ``lib`` can build method ``name``, else the reason it cannot (for the tables)."""
    method = METHODS[name]
    if method.kind != "peft":
        return None if lib == "deltatune" else "same as deltatune (no adapter library involved)"
    builder = method.dt if lib == "deltatune" else method.hf
    if builder is None:
        return f"{lib} has no {name}"
    try:
        builder(task_type)
    except AttributeError as exc:
        return f"not in {lib} yet ({exc})"
    except Exception as exc:  # noqa: BLE001 - a config error is a result to report, not a crash
        return f"{type(exc).__name__}: {exc}"
    return None


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classification head of a transformers sequence classifier (``classifier`` or ``score``)."""
    heads = [getattr(model, n) for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train.")
    return heads


def build(model: nn.Module, name: str, lib: str, task_type: str, options: dict[str, Any] | None = None) -> nn.Module:
    """Apply method ``name`` of library ``lib`` to ``model``; trainable parameters have requires_grad.

    ``options`` override fields of the method's config (``{"r": 16, "target_modules": "all-linear"}``),
    the same way for both libraries (used by the recipe search, :mod:`bench.recipe`).
    """
    method = METHODS[name]
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.kind == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        for head in head_modules(model):
            for p in head.parameters():
                p.requires_grad_(True)
        return model
    if lib == "deltatune":
        assert method.dt is not None
        return _dt().get_delta_model(model, replace(method.dt(task_type), **(options or {})))
    assert method.hf is not None
    return _hf().get_peft_model(model, replace(method.hf(task_type), **(options or {})))


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tensors shared by several modules count once.

    The total is that of the frozen model plus the adapter (HF peft's convention), so the share is
    ``trainable / total``. ``modules_to_save`` copies count in both.
    """
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
