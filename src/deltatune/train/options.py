"""Training options: one dataclass, filled from defaults < a YAML file < the command line.

Every option has the same name in the YAML file and on the command line (``max_steps`` /
``--max-steps``). Method options (``r``, ``target_modules``, ...) go in a ``method_options`` mapping in
YAML or as repeated ``--method-opt key=value`` on the command line; they are checked against the method's
config dataclass (``deltatune.get_method(name).config_cls``), so every registered method works.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import all_methods, get_method

TASKS = ("seq_cls", "instruct", "causal_lm", "seq2seq")
SCHEDULES = ("linear", "cosine", "constant")
PROMPT_FORMATS = ("auto", "chat", "plain")
TASK_TYPE = {"seq_cls": "SEQ_CLS", "instruct": "CAUSAL_LM", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# Options that may differ between a run and its ``--resume`` without changing the result.
RESUME_FREE = ("resume", "quiet", "overwrite", "output_dir", "save_every", "keep_checkpoints", "threads",
               "dist_timeout")


@dataclass
class TrainOptions:
    """Everything ``deltatune train`` needs.

    Attributes:
        model: bundled name (``minilm``, ``smollm2``) or a local transformers model folder.
        method: a registered method (``lora``, ...); ``method_options`` are its config fields.
        task: ``seq_cls`` (classification), ``instruct`` (causal LM on prompt/response pairs, loss on the
            response tokens only), ``causal_lm`` (plain text), ``seq2seq``; ``None`` picks from the data.
        data: built-in data set (``trec``, ``rt``, ``bbc``, ``sms``, ``chatterbot``) or a local
            ``.jsonl``/``.csv``/``.tsv``/``.txt`` file; a lone file is split 80/10/10 with ``split_seed``.
        validation_data / test_data: local files for those splits (then ``data`` is used whole for training).
        epochs / max_steps: length of training; ``max_steps`` (optimizer steps) wins when set.
        batch_size / grad_accum: examples per forward pass / forward passes per optimizer step.
        group_by_length: batch rows of similar length together (less padding, faster; batches stay random).
        lr, schedule, warmup_ratio, warmup_steps: peak learning rate, its decay (linear, cosine, constant)
            and linear warm-up (``warmup_steps`` wins over ``warmup_ratio``).
        loraplus_lr_ratio: LoRA+ (Hayou et al., arXiv 2402.12354): LoRA's B matrices learn at
            ``lr * ratio`` (the paper suggests 2..16), everything else at ``lr``.
        eval_every / save_every: validation and checkpoint every N optimizer steps (0: only at the end / never).
        threads: CPU threads for torch (``torch.set_num_threads``); ``None`` keeps torch's default.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        fsdp / bf16 / dist_timeout: under ``torchrun``, shard the base model (FSDP) instead of replicating it
            (DDP); compute in bfloat16; seconds a rank waits for the others before the job fails
            (see :mod:`deltatune.train.distributed`). ``batch_size`` is per rank.
        quantize: load the frozen base quantized (``nf4``, ``fp4``, ``int8``, ``torchao-int8``; QLoRA-style
            training, see :mod:`deltatune.quant`); the adapter stays in float32.
    """

    model: str = "minilm"
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    data: str = "trec"
    validation_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    max_train_examples: int | None = None
    group_by_length: bool = False
    max_eval_examples: int | None = None
    split_seed: int = 0
    prompt_format: str = "auto"
    epochs: int = 2
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None
    max_length: int = 128
    seed: int = 42
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str = "runs/latest"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    threads: int | None = None
    device: str = "auto"
    quiet: bool = False
    resume: bool = False
    overwrite: bool = False
    fsdp: bool = False
    bf16: bool = False
    dist_timeout: float = 600.0
    quantize: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option and what is allowed."""
        _choice("task", self.task, (*TASKS, None))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        names = [m.name for m in all_methods()]
        if self.method not in names:
            raise ConfigError(f"method={self.method!r} is not a registered method; choose one of {names}.")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "max_train_examples", "max_eval_examples", "warmup_steps", "threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), allow_zero=name == "warmup_steps")
        for name in ("eval_every", "save_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not (isinstance(self.dist_timeout, (int, float)) and math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ConfigError(f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}.")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0 disables clipping).")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ConfigError(f"loraplus_lr_ratio must be > 0 (the paper uses 2..16), got {self.loraplus_lr_ratio!r}.")
        self._validate_quantize()
        if not isinstance(self.method_options, dict):
            raise ConfigError(f"method_options must be a mapping of option -> value, got {self.method_options!r}.")

    def _validate_quantize(self) -> None:
        """Refuse what cannot run with ``quantize`` before anything is loaded or written."""
        if self.quantize is None:
            return
        from ..quant import KINDS, QuantizationError, require_backend

        _choice("quantize", self.quantize, (*KINDS, None))
        require_backend(self.quantize)
        if self.fsdp:
            raise QuantizationError("--quantize cannot be combined with --fsdp (FSDP does not shard bitsandbytes/torchao "
                                    "weights); drop --fsdp (quantized bases are small enough to replicate).")
        if self.compile:
            raise QuantizationError("--quantize cannot be combined with --compile in deltatune; drop --compile.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def method_config(self, task: str) -> DeltaConfig:
        """The method's config from ``method_options``, with ``task_type`` set from ``task``."""
        spec = get_method(self.method)
        known = {f.name for f in dataclasses.fields(spec.config_cls) if f.init}
        unknown = sorted(set(self.method_options) - known)
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {unknown} for method {self.method!r}; its options are {sorted(known)}."
            )
        values = {"task_type": TASK_TYPE[task], **self.method_options}
        try:
            return spec.config_cls(**values)
        except TypeError as exc:
            raise ConfigError(f"Bad option value for method {self.method!r}: {exc}") from exc

    def differences(self, other: TrainOptions) -> list[str]:
        """Options (outside :data:`RESUME_FREE`) whose values differ from ``other``'s."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if k not in RESUME_FREE and mine[k] != theirs[k]]


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = [a for a in allowed if a is not None]
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {shown}.")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{name} must be an integer {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


def parse_method_opt(text: str) -> tuple[str, Any]:
    """``"r=8"`` -> ``("r", 8)``; the value is read as YAML (``[query,value]`` is a list, ``true`` a bool)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"--method-opt expects key=value (e.g. r=8 or target_modules=[query,value]), got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--method-opt {text!r}: the value is not valid YAML ({exc}).") from exc
    return key, value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Options from a YAML file: a mapping of option names (dashes or underscores) to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, not {type(data).__name__}.")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; known options: {sorted(known)}.")
    return out


def build_options(file_values: dict[str, Any], cli_values: dict[str, Any]) -> TrainOptions:
    """Defaults, then the YAML file's values, then the command line's (method options merge key by key)."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if k != "method_options"}}
    merged["method_options"] = {**(file_values.get("method_options") or {}), **cli_values.get("method_options", {})}
    merged = {k: _coerce(k, v) for k, v in merged.items()}
    try:
        return TrainOptions(**merged)
    except TypeError as exc:
        raise ConfigError(f"Bad training options: {exc}") from exc


def _coerce(name: str, value: Any) -> Any:
    """Turn YAML strings such as ``1e-3`` (a string for YAML 1.1) into the option's number type."""
    kind = str(_FIELD_TYPES.get(name, ""))
    if not isinstance(value, str):
        return float(value) if kind.startswith("float") and isinstance(value, int) and not isinstance(value, bool) else value
    for prefix, convert in (("float", float), ("int", int)):
        if kind.startswith(prefix):
            try:
                return convert(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number ({prefix}), got {value!r}.") from None
    return value


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainOptions)}
