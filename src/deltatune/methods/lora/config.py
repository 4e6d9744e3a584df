"""``LoraConfig``: HF peft's field names and defaults, validated on creation."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

from torch import nn

from ...config import TargetedConfig
from ...errors import ConfigError
from .recipe import RECOMMENDED_EPOCHS, RECOMMENDED_LR, RECOMMENDED_OPTIONS, task_type_of

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "loftq")
#: Initialisations that change the base weight (PiSSA/OLoRA: the residual; LoftQ: its quantization) to fit
#: ``A``/``B``: a saved adapter of theirs fits that new base only.
REWRITES_BASE = ("pissa", "olora", "loftq")
BIAS_CHOICES = ("none", "all", "lora_only")
#: LoftQ's bits -> the bitsandbytes quantization it fits by default (HF peft's: NF4 for 4 bits, LLM.int8() for 8).
LOFTQ_DEFAULT_KINDS = {4: "nf4", 8: "int8"}
#: Every quantization kind LoftQ can fit (bitsandbytes'; torchao's int8 has no LoftQ quantizer here).
LOFTQ_KINDS = ("nf4", "fp4", "int8")


@dataclass
class LoftQConfig:
    """LoftQ's settings (HF peft's names): ``loftq_bits`` (4: NF4, 8: int8) and ``loftq_iter`` (T >= 1, the
    number of alternating quantize / SVD steps); see :mod:`deltatune.methods.lora.loftq`.

    ``loftq_quantization`` (deltatune's, not peft's) names the bitsandbytes quantization that ``Q`` takes, in
    ``--quantize``'s spelling: ``"nf4"``, ``"fp4"``, a 4-bit kind with its block size (``"nf4:32"``) or ``"int8"``;
    it must agree with ``loftq_bits``. ``None`` (default): NF4 at block size 64 for 4 bits, int8 for 8.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1
    loftq_quantization: str | None = None

    def __post_init__(self) -> None:
        if self.loftq_bits not in LOFTQ_DEFAULT_KINDS:
            raise ConfigError(f"loftq_bits={self.loftq_bits!r} is not supported; use 4 (NF4) or 8 (int8).")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter={self.loftq_iter!r} must be an integer >= 1 (the alternating steps T).")
        if self.loftq_quantization is not None:
            self.loftq_quantization = _loftq_quantization(self.loftq_quantization, self.loftq_bits)

    def quantization(self) -> str:
        """The quantization ``Q`` takes: ``"nf4"``, ``"fp4:32"``, ``"int8"`` ..."""
        return self.loftq_quantization or LOFTQ_DEFAULT_KINDS[self.loftq_bits]

    @classmethod
    def of(cls, value: LoftQConfig | dict[str, Any]) -> LoftQConfig:
        """``value`` (a ``LoftQConfig`` or the dict saved in ``adapter_config.json``) as a validated ``LoftQConfig``."""
        if isinstance(value, LoftQConfig):
            return cls(value.loftq_bits, value.loftq_iter, value.loftq_quantization)
        if not isinstance(value, dict):
            raise ConfigError(f"loftq_config must be a mapping such as {{loftq_bits: 4, loftq_iter: 1}}, got {value!r}.")
        unknown = sorted(set(value) - {"loftq_bits", "loftq_iter", "loftq_quantization"})
        if unknown:
            raise ConfigError(f"loftq_config has unknown keys {unknown}; it takes loftq_bits, loftq_iter and "
                              "loftq_quantization.")
        return cls(**value)


def _loftq_quantization(spec: str, bits: int) -> str:
    """``spec`` checked (a bitsandbytes kind of ``bits`` bits) and written the one way (``"nf4:64"`` -> ``"nf4"``)."""
    from ...quant.convert import parse_kind
    from ...quant.errors import QuantizationError
    from ...quant.spec import kind_spec

    try:
        kind, blocksize = parse_kind(spec)
    except QuantizationError as err:
        raise ConfigError(f"loftq_quantization={spec!r}: {err}") from None
    if kind not in LOFTQ_KINDS:
        raise ConfigError(f"loftq_quantization={spec!r}: LoftQ fits a bitsandbytes quantization (nf4, fp4, nf4:BLOCKSIZE, "
                          "fp4:BLOCKSIZE or int8); torchao's int8 is not supported.")
    if (8 if kind == "int8" else 4) != bits:
        raise ConfigError(f"loftq_quantization={spec!r} is {8 if kind == 'int8' else 4}-bit but loftq_bits={bits}; "
                          "make them agree (4 for nf4/fp4, 8 for int8).")
    return kind_spec(kind, blocksize)


@dataclass
class LoraConfig(TargetedConfig):
    """Low-rank adaptation: ``h = W x + (alpha / r) * B A x`` (Hu et al., arXiv 2106.09685).

    Attributes:
        r: rank of the update (> 0).
        lora_alpha: scale numerator; the update is multiplied by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the adapter's input (0 disables it at no cost).
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``); detected
            automatically, kept for HF peft compatibility.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (the biases of
            wrapped layers); trained biases are saved with the adapter.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, arXiv 2312.03732).
        use_dora: weight-decomposed LoRA (Liu et al., arXiv 2402.09353), linear layers only.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: starts as the base model),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"olora"`` (A = R_r, B = Q_r from the QR ``W = Q R``,
            W replaced by ``W - s B A``; Buyukakyuz, arXiv 2406.01775), ``"pissa"`` (A, B from the top-r
            singular vectors of W,
            W replaced by the residual; Meng et al., arXiv 2404.02948) or ``False`` (A and B both random,
            for tests: the adapter changes the output from the start), or ``"loftq"`` (with ``loftq_config``:
            the targeted float linear layers become bitsandbytes layers holding the LoftQ quantization ``Q`` and
            ``A``, ``B`` fit ``W - Q``; Li et al., arXiv 2310.08659; see :mod:`.loftq`).
        loftq_config: ``LoftQConfig(loftq_bits=4, loftq_iter=1)`` for ``init_lora_weights="loftq"`` (kept as
            a dict, as HF peft does); ignored with a warning otherwise.
        rank_pattern / alpha_pattern: ``{regex: value}`` overriding ``r`` / ``lora_alpha`` for modules
            whose path ends with a match.
        target_parameters: names (suffixes) of 3-D expert parameters to adapt, one low-rank update per
            expert (mixture-of-experts models, ``["experts.gate_up_proj", "experts.down_proj"]``; see
            :mod:`.experts`). With ``target_modules=[]`` only these are adapted.
        ensure_weight_tying: LoRA on an input embedding tied to the output head acts on both sides of the
            tie (HF peft's option; see :mod:`.tied`). Without it the head keeps the base embedding and
            merging is refused.
    """

    PEFT_TYPE: ClassVar[str] = "LORA"
    #: Peak learning rate of :meth:`recommended`'s recipe (``deltatune train`` uses it by default).
    RECOMMENDED_LR: ClassVar[float] = RECOMMENDED_LR
    #: Epochs of :meth:`recommended`'s recipe (``deltatune train``'s default with the recipe's options).
    RECOMMENDED_EPOCHS: ClassVar[int] = RECOMMENDED_EPOCHS
    #: The fields :meth:`recommended` sets (``deltatune train`` uses them when given no method options).
    RECOMMENDED_OPTIONS: ClassVar[dict[str, Any]] = RECOMMENDED_OPTIONS
    METADATA_FIELDS: ClassVar[frozenset[str]] = TargetedConfig.METADATA_FIELDS | {"megatron_core", "qalora_group_size"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_parameters: list[str] | None = None
    ensure_weight_tying: bool = False
    loftq_config: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = [self.r, *self.rank_pattern.values()]
        if any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ConfigError(f"LoRA rank r must be a positive integer; got r={self.r}, rank_pattern={self.rank_pattern}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}.")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias={self.bias!r} is not one of {BIAS_CHOICES}.")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} is not one of {INIT_CHOICES}.")
        self._check_loftq()

    def _check_loftq(self) -> None:
        """peft's rules: ``"loftq"`` needs ``loftq_config``; a ``loftq_config`` without it is dropped with a warning."""
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. "
                                  "loftq_config=dt.LoftQConfig(loftq_bits=4, loftq_iter=1).")
            settings = asdict(LoftQConfig.of(self.loftq_config))  # peft's keys, and deltatune's only when set
            self.loftq_config = {k: v for k, v in settings.items() if v is not None}
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'.", stacklevel=3)
            self.loftq_config = {}

    @classmethod
    def recommended(cls, model: nn.Module | None = None, **overrides: Any) -> LoraConfig:
        """deltatune's measured recipe (see :mod:`deltatune.methods.lora.recipe`), not peft's defaults.

        LoRA on every linear layer (``"all-linear"``: the output head excluded), ``r=32``,
        ``lora_alpha=64``, ``lora_dropout=0.1``; train it at :attr:`RECOMMENDED_LR` for
        :attr:`RECOMMENDED_EPOCHS` epochs. ``task_type`` comes
        from ``model``'s class (``...ForSequenceClassification`` -> ``"SEQ_CLS"``) unless given;
        ``overrides`` replace any field::

            config = dt.LoraConfig.recommended(model)
            model = dt.get_delta_model(model, config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=dt.LoraConfig.RECOMMENDED_LR)
        """
        values = {"task_type": task_type_of(model), **RECOMMENDED_OPTIONS, **overrides}
        return cls(**values)

    def checkpoint_config(self) -> LoraConfig:
        """Saved PiSSA / OLoRA / LoftQ adapters read back as plain LoRA: their ``A``/``B`` are in the file, and the
        base they fit is the rewritten one (residual, or LoftQ's quantization), so a load must neither redo the
        initialisation nor change the base again (HF peft's own advice is to save such adapters with
        ``init_lora_weights=True``)."""
        if self.init_lora_weights not in REWRITES_BASE:
            return self
        return replace(self, init_lora_weights=True, loftq_config={})
