"""The ``deltatune`` command line's grammar: every subcommand, its options and their help texts.

:func:`build_parser` is all that :mod:`deltatune.cli` needs from here; the handlers that run a parsed command
live there. Nothing here imports torch or transformers at module level (``--help`` stays fast); the train
options and the quantization spelling are read lazily, when the parser is built or a value is parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

EPILOG = "Models: 'minilm', 'smollm2' (bundled) or a local transformers folder. Nothing is downloaded."


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return action.help
        return super()._get_help_string(action)


def _type_of(field: dataclasses.Field) -> Any:
    """The argparse ``type`` of a :class:`TrainOptions` field: float, int, or str for everything else."""
    text = str(field.type)
    return float if text.startswith("float") else int if text.startswith("int") else str


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    """``train``'s options: one flag per :class:`~deltatune.train.options.TrainOptions` field, plus the extras.

    Every field flag defaults to ``SUPPRESS`` so that only what the command line says overrides a ``--config``
    file; the defaults are printed in the help text from the dataclass.
    """
    from .train.options import TASKS, TrainOptions

    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (command-line options win)")
    for field in dataclasses.fields(TrainOptions):
        if field.name == "method_options":
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = field.metadata["help"] + (f" (default: {default})" if default not in (None, False) else "")
        if str(field.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif field.name == "task":
            parser.add_argument(flag, choices=TASKS, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_type_of(field), default=argparse.SUPPRESS, help=help_text,
                                metavar=field.name.upper())
    parser.add_argument("--method-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="method option, repeatable, value read as YAML: r=8, lora_alpha=16, "
                        "target_modules=[query,value], use_dora=true")
    parser.add_argument("--list-methods", action="store_true", help="list the registered methods and their options")


def _adapter_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The ADAPTER positional (optional when ``required`` is False), ``--model`` and the quantization flags."""
    parser.add_argument("adapter", nargs=None if required else "?", metavar="ADAPTER",
                        help="run folder from 'deltatune train' or an adapter folder" + ("" if required else
                        " (omit to use the base model alone)"))
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    _quantize_arg(parser)


def _quantization(text: str) -> str:
    """``--quantize``'s value: a kind, 4-bit kinds optionally with ``:BLOCKSIZE`` (refused here if unknown)."""
    from .quant.convert import QuantizationError, parse_kind
    from .quant.spec import kind_spec

    try:
        return kind_spec(*parse_kind(text))  # "nf4:64" -> "nf4": the spelling the fingerprint records
    except QuantizationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _quantize_arg(parser: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--quantize-embeddings`` of the commands that load an adapter's base."""
    parser.add_argument("--quantize", type=_quantization, metavar="{nf4,fp4,int8,torchao-int8}[:BLOCKSIZE]",
                        help="load the base quantized (default: as the adapter's base was when it was trained); "
                        "nf4/fp4 take a block size, e.g. nf4:32 (default 64)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="with --quantize: the token embedding (and the LM head tied to it) quantized too")


def _threads_arg(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads for the command."""
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores not busy with other "
                        "work, or OMP_NUM_THREADS when set)")


def _column_args(parser: argparse.ArgumentParser) -> None:
    """``--text-column`` ... ``--response-column``: column names of a local data file."""
    for name in ("text", "label", "prompt", "response"):
        parser.add_argument(f"--{name}-column", default=None, help=f"{name} column of a local data file")


def build_parser() -> argparse.ArgumentParser:
    """The ``deltatune`` parser with every subcommand; ``args.command`` names the one given."""
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("train", help="fine-tune a model with a PEFT method", epilog=EPILOG,
                       description="Fine-tune MODEL on DATA with METHOD; writes the adapter, metrics.jsonl, "
                       "summary.json and plots to --output-dir.")
    _add_train_options(p)
    _add_inference_commands(sub)
    _add_tool_commands(sub)
    _add_serve_command(sub)
    return parser


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    """``serve``: the OpenAI-compatible server's options (vLLM's spellings accepted where they exist)."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a base model and its adapters",
                       formatter_class=_HelpFormatter, epilog=EPILOG,
                       description="Serves /v1/completions, /v1/chat/completions and /v1/models; requests for any "
                       "mix of adapters are decoded together (continuous batching). Needs deltatune[serve].")
    p.add_argument("--model", required=True, help="base model: bundled name (smollm2) or a local folder")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="serve this adapter as model NAME "
                   "(repeatable; PATH: run folder or adapter folder)")
    p.add_argument("--lora-modules", action="extend", nargs="+", dest="adapter", metavar="NAME=PATH",
                   help="vLLM's spelling of --adapter: several NAME=PATH after one flag")
    p.add_argument("--enable-lora", action="store_true", help="accepted so vLLM command lines run unchanged; "
                   "adapters are always enabled here")
    p.add_argument("--served-model-name", metavar="NAME", help="the base model's name in requests and /v1/models "
                   "(vLLM's flag; default: the --model folder's name)")
    p.add_argument("--adapters-dir", metavar="DIR", help="allow POST /v1/adapters to load adapters from inside DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"), help="require 'Authorization: Bearer "
                   "KEY' on every route but /health (default: $DELTATUNE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt tokens prefilled between two "
                   "decoding steps (newcomers beyond it wait for the next step)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt in tokens")
    p.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quantize", type=_quantization, metavar="{nf4,fp4,int8,torchao-int8}[:BLOCKSIZE]",
                   help="load the base model quantized (adapters must have been trained on the same quantization; "
                   "default: as the --adapter folders' bases were trained); nf4/fp4 take a block size, e.g. nf4:32 "
                   "(default 64)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="with --quantize: the token embedding (and the LM head tied to it) quantized too")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="log level")


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    """``eval``, ``predict`` and ``generate``: commands that run an adapter (or the base alone) on inputs."""
    fmt = _HelpFormatter
    p = sub.add_parser("eval", help="metrics of an adapter (or the base model alone) on a data split",
                       formatter_class=fmt, epilog=EPILOG,
                       description="Accuracy and macro-F1 (classification) or loss and perplexity (language models).")
    _adapter_args(p, required=False)
    p.add_argument("--data", help="built-in data set or local file (default: the data the run trained on)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test", "all"], help="which split")
    p.add_argument("--task", choices=["seq_cls", "instruct", "causal_lm", "seq2seq"], help="task (default: the adapter's)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--max-examples", "--max-eval-examples", dest="max_examples", type=int,
                   help="evaluate only the first N rows of the split (train's name for it works too)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads_arg(p)
    _column_args(p)

    p = sub.add_parser("predict", help="labels and probabilities from a classification adapter",
                       formatter_class=fmt, epilog=EPILOG)
    _adapter_args(p)
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--file", help="texts to classify: .txt (one per line), .jsonl or .csv")
    p.add_argument("--text-column", default="text", help="text column of a .jsonl/.csv file")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--json", action="store_true", help="one JSON object per line with every class probability")
    _threads_arg(p)

    p = sub.add_parser("generate", help="text from prompts with a causal-LM adapter active",
                       formatter_class=fmt, epilog=EPILOG)
    _adapter_args(p, required=False)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="prompts: .txt (one per line), .jsonl or .csv")
    p.add_argument("--text-column", default="text", help="prompt column of a .jsonl/.csv file")
    p.add_argument("--task", choices=["instruct", "causal_lm"], help="task when no adapter is given")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _threads_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """``merge``, ``combine``, ``inspect``, ``export`` and ``demo``: commands that write or describe files."""
    fmt = _HelpFormatter
    p = sub.add_parser("merge", help="write a standalone model with the adapter folded into its weights",
                       formatter_class=fmt, epilog=EPILOG,
                       description="The output folder loads with plain transformers (AutoModel...from_pretrained).")
    _adapter_args(p)
    p.add_argument("output", metavar="OUTPUT", help="new folder for the merged model and tokenizer")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="dequantize a quantized base and write a "
                   "full-precision merged model in this dtype (default: merge into the base as loaded)")

    p = sub.add_parser("combine", help="a new adapter from weighted adapters (sum, SVD, TIES, DARE, ...)",
                       formatter_class=fmt, epilog=EPILOG,
                       description="Loads every ADAPTER onto one base and writes their weighted combination as an "
                       "adapter folder. svd/cat give the exact weighted sum of the deltas (svd --rank: its best "
                       "approximation of that rank); linear/ties/dare_*/magnitude_prune merge the factors as HF peft.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders or run folders (same method)")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter (negative subtracts)")
    p.add_argument("--type", dest="combination_type", default="svd",
                   choices=["svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"],
                   help="combination type")
    p.add_argument("--rank", type=int, help="svd: rank of the result (default: exact)")
    p.add_argument("--density", type=float, help="ties / dare_* / magnitude_prune: share of entries kept")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="TIES sign election")
    p.add_argument("--seed", type=int, default=0, help="dare_*: seed of the random drops")
    p.add_argument("--model", help="base model (default: the one the first adapter was trained on)")
    p.add_argument("--out", required=True, help="new folder for the combined adapter")

    p = sub.add_parser("inspect", help="what an adapter folder holds; optionally check it against a base model",
                       formatter_class=fmt, epilog=EPILOG)
    p.add_argument("adapter", metavar="ADAPTER", help="run folder or adapter folder")
    p.add_argument("--base", help="base model to check the adapter's fingerprint against")
    p.add_argument("--json", action="store_true", help="print everything as JSON")

    p = sub.add_parser("export", help="write an adapter in another tool's format (gguf: a LoRA for llama.cpp)",
                       formatter_class=fmt, epilog=EPILOG,
                       description="--format gguf writes a GGUF LoRA that llama.cpp loads with --lora FILE.gguf "
                       "(LoRA adapters on Llama-architecture bases; DoRA, rank/alpha patterns, trained biases or "
                       "modules are refused).")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder, Trainer checkpoint-N folder or run folder")
    p.add_argument("--format", required=True, choices=["gguf"], help="output format")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write, e.g. adapter.gguf")
    p.add_argument("--model", help="base model (local folder or bundled name) if the one the adapter records is not "
                   "here; only its config.json is read")

    p = sub.add_parser("demo", help="fine-tune MiniLM with LoRA on TREC and compare with baselines (a few minutes)",
                       formatter_class=fmt, epilog=EPILOG,
                       description="Fine-tunes the bundled MiniLM with the default LoRA recipe (every linear "
                       "layer, its rank, rate and epochs: see 'deltatune train --list-methods') plus the classifier head on "
                       "2,000 TREC questions, then prints test accuracy next to the "
                       "majority-class baseline and the untrained model. No arguments needed.")
    p.add_argument("--output-dir", default="runs/demo", help="where the adapter, plots and report go")
    p.add_argument("--max-train-examples", type=int, help="training questions (default: 2000)")
    p.add_argument("--max-eval-examples", type=int, help="use only the first N validation/test questions")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (quick smoke runs)")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores not busy with other work)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
