"""Training options: one dataclass, filled from defaults < a YAML file < the command line.

Every option has the same name in the YAML file and on the command line (``max_steps`` /
``--max-steps``). Method options (``r``, ``target_modules``, ...) go in a ``method_options`` mapping in
YAML or as repeated ``--method-opt key=value`` on the command line; they are checked against the method's
config dataclass (``deltatune.get_method(name).config_cls``), so every registered method works.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DeltaConfig
from ..errors import ConfigError
from ..registry import all_methods, get_method
from .data.sources import DataSpec
from .extras import require_yaml
from .fields import option

DEFAULT_LR = 2e-3  # methods without a measured recipe, or with options the user chose
DEFAULT_EPOCHS = 2  # the same
TASKS = ("seq_cls", "instruct", "causal_lm", "seq2seq")
SCHEDULES = ("linear", "cosine", "constant")
PROMPT_FORMATS = ("auto", "chat", "plain")
TASK_TYPE = {"seq_cls": "SEQ_CLS", "instruct": "CAUSAL_LM", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# Options that may differ between a run and its ``--resume`` without changing the result.
RESUME_FREE = ("resume", "quiet", "overwrite", "output_dir", "save_every", "keep_checkpoints", "threads",
               "dist_timeout")


@dataclass
class TrainOptions(DataSpec):
    """Everything ``deltatune train`` needs: what to read (the :class:`DataSpec` fields it extends) and how
    to train. Each option is documented once, in its field's ``metadata["help"]``, which ``deltatune train
    --help`` prints; YAML keys and command-line flags share the field names (``max_steps`` / ``--max-steps``).
    Under ``torchrun``, ``batch_size`` is per rank (see :mod:`deltatune.train.distributed`).
    """

    model: str = option("minilm", "base model: bundled name (minilm, smollm2) or a local transformers folder")
    method: str = option("lora",
        "PEFT method, any registered one (default: lora); see 'deltatune train --list-methods'")
    method_options: dict[str, Any] = option(factory=dict, help=
        "the method's config fields (r, lora_alpha, target_modules, ...): --method-opt key=value or a "
        "method_options mapping in YAML")
    task: str | None = option(None,
        "seq_cls | instruct (prompt/response, loss on the response) | causal_lm (plain text) | seq2seq; "
        "default: from the data")
    max_train_examples: int | None = option(None,
        "use only the first N training rows of the (shuffled) split")
    group_by_length: bool = option(False,
        "put rows of similar length in the same batch: less padding, faster (order stays seeded)")
    max_eval_examples: int | None = option(None, "use only the first N validation/test rows")
    prompt_format: str = option("auto",
        "instruct prompts: auto (chat template if the tokenizer has one) | chat | plain")
    epochs: int | None = option(None,
        "passes over the training rows (default: the method's recommended epochs when its recommended options "
        f"are used (LoRA: see 'deltatune train --list-methods'), else {DEFAULT_EPOCHS})")
    max_steps: int | None = option(None, "stop after N optimizer steps (overrides --epochs)")
    batch_size: int = option(16, "rows per forward pass (per rank under torchrun)")
    grad_accum: int = option(1, "forward passes per optimizer step")
    lr: float | None = option(None,
        "peak learning rate (default: the method's recommended rate when its recommended options are used "
        f"(LoRA: see 'deltatune train --list-methods'), else {DEFAULT_LR})")
    schedule: str = option("linear", "learning-rate decay after warm-up: linear | cosine | constant")
    warmup_ratio: float = option(0.06, "share of steps with linear warm-up")
    warmup_steps: int | None = option(None, "warm-up steps (overrides --warmup-ratio)")
    weight_decay: float = option(0.01, "AdamW weight decay of matrices")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    loraplus_lr_ratio: float | None = option(None,
        "LoRA+ (Hayou et al., arXiv 2402.12354): LoRA's B matrices learn at lr x RATIO (the paper suggests "
        "2..16)")
    max_length: int = option(128, "longest sequence in tokens")
    seed: int = option(42, "seed of initialisation, data order and dropout")
    eval_every: int = option(0, "evaluate on the validation split every N steps (0: only at the end)")
    save_every: int = option(0, "write a resumable checkpoint every N steps (0: never)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    output_dir: str = option("runs/latest", "run folder: adapter, metrics, plots, checkpoints")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    compile: bool = option(False, "run the training forward pass through torch.compile")
    compile_backend: str = option("inductor", "torch.compile backend")
    threads: int | None = option(None,
        "CPU threads for torch (default: the cores not busy with other work, or OMP_NUM_THREADS when set)")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    quiet: bool = option(False, "no progress bar or per-evaluation lines; one summary line at the end")
    resume: bool = option(False,
        "continue from the newest checkpoint in --output-dir (starts fresh if there is none)")
    overwrite: bool = option(False, "replace an earlier run in --output-dir")
    fsdp: bool = option(False,
        "under torchrun: shard the frozen base model across ranks (FSDP) instead of replicating it (DDP)")
    bf16: bool = option(False, "compute in bfloat16 (autocast; FSDP: bf16 compute, fp32 gradient reduction)")
    quantize: str | None = option(None,
        "load the frozen base quantized: nf4, fp4, int8 (bitsandbytes) or torchao-int8 (QLoRA-style; nf4/fp4 take a "
        "block size, e.g. nf4:32, default 64; the adapter "
        "stays float32; needs pip install 'deltatune[quant]')")
    quantize_embeddings: bool = option(False,
        "with --quantize: also store the token embedding (and the LM head tied to it) quantized the same way; "
        "recorded with the adapter, so eval/generate/merge reload the base alike")
    dist_timeout: float = option(600.0,
        "under torchrun: seconds a rank waits for the others before the job fails with an error")

    def __post_init__(self) -> None:
        self._apply_recipe()
        self.validate()

    def _apply_recipe(self) -> None:
        """Fill in the method's measured recipe (``RECOMMENDED_OPTIONS`` / ``RECOMMENDED_LR`` /
        ``RECOMMENDED_EPOCHS`` of its config class, e.g. :meth:`deltatune.LoraConfig.recommended`) where the
        user chose nothing.

        No method options given -> the recipe's options; then no ``lr`` (``epochs``) given -> the recipe's
        rate (epochs). A rate and a schedule are only measured together with their options: with options of
        the user's own, the defaults are :data:`DEFAULT_LR` and :data:`DEFAULT_EPOCHS`. Methods without a
        recipe keep their config's defaults, :data:`DEFAULT_LR` and :data:`DEFAULT_EPOCHS`.
        """
        names = [m.name for m in all_methods()]
        cls = get_method(self.method).config_cls if self.method in names else None  # else validate() names them
        recipe = getattr(cls, "RECOMMENDED_OPTIONS", None)
        use_recipe = recipe is not None and self.method_options == {}
        if use_recipe:
            self.method_options = dict(recipe)
        recipe_lr, recipe_epochs = (getattr(cls, f"RECOMMENDED_{n}", None) if use_recipe else None
                                    for n in ("LR", "EPOCHS"))
        if self.lr is None:
            self.lr = recipe_lr if recipe_lr is not None else DEFAULT_LR
        if self.epochs is None:
            self.epochs = recipe_epochs if recipe_epochs is not None else DEFAULT_EPOCHS

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
        # init_lora_weights=loftq: checked, and given --quantize's kind
        from .loftq_base import complete_loftq_options

        complete_loftq_options(self.method, self.method_options, self.quantize)

    def _validate_quantize(self) -> None:
        """Refuse what cannot run with ``quantize`` before anything is loaded or written."""
        from ..quant import QuantizationError, require_backend
        from ..quant.convert import parse_kind
        from ..quant.load import check_quantize_options

        check_quantize_options(self.quantize, self.quantize_embeddings)
        if self.quantize is None:
            return
        try:  # the one check of the spelling: a known kind, and for nf4/fp4 a block size bitsandbytes supports
            parse_kind(self.quantize)
        except QuantizationError as err:  # its message names the bad value and the choices; add the option's name
            raise ConfigError(f"quantize: {err}") from None
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
    require_yaml("--method-opt")
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
    require_yaml(f"The option file {path}")
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
