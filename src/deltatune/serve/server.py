"""``deltatune serve``: load the base and adapters, start the engine, run uvicorn until SIGTERM/SIGINT.

On SIGTERM (or Ctrl-C) the server stops accepting connections, lets the requests in flight finish
for up to ``--shutdown-timeout`` seconds (then cancels the rest), stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..bundled import resolve_model_path
from ..errors import ConfigError
from .adapters import AdapterRegistry, adapter_folder
from .app import Limits, Server, create_app
from .base_choice import apply_adapter_base, served_quantization
from .engine import Engine
from .errors import ApiError


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a choice: the model's generation config (as ``generate`` uses), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def parse_adapter_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter {text!r}: expected NAME=PATH (e.g. --adapter support=runs/support).")
    return name, Path(path)


def build_server(args: argparse.Namespace) -> Server:
    """Everything but the HTTP listener: model, tokenizer, adapters, engine, limits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quant.load import check_quantize_options

    check_quantize_options(getattr(args, "quantize", None), getattr(args, "quantize_embeddings", False))
    adapters = [parse_adapter_arg(text) for text in args.adapter or []]  # bad options fail before loading
    for name, folder in adapters:
        if not folder.exists():
            raise ConfigError(f"--adapter {name}={folder}: no such folder.")
    folders = [(name, adapter_folder(folder)) for name, folder in adapters]  # run folders -> their adapter/
    quantize, quantize_embeddings = served_quantization(
        getattr(args, "quantize", None), getattr(args, "quantize_embeddings", False), folders)
    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else None
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise ConfigError(f"--adapters-dir {adapters_dir} is not a directory.")
    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_prompt_tokens", "max_n", "max_body_bytes",
                 "max_prefill_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if quantize:
        from ..quant.load import from_pretrained_quantized

        model = from_pretrained_quantized(AutoModelForCausalLM, path, quantize, embeddings=quantize_embeddings).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base_from = apply_adapter_base(model, folders)
    base_name = getattr(args, "served_model_name", None) or Path(str(args.model).rstrip("/")).name or str(args.model)
    registry = AdapterRegistry(model, base_name, adapters_dir, base_from=base_from)
    for name, folder in adapters:
        try:
            registry.load(name, folder)
        except ApiError as exc:
            raise ConfigError(f"--adapter {name}={folder}: {exc.message}") from exc
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=min(args.max_prompt_tokens, positions),
                    max_tokens=args.max_tokens_limit, max_n=min(args.max_n, args.max_batch), context_length=positions)
    engine = Engine(registry, tokenizer, eos_ids(model, tokenizer), max_batch=args.max_batch,
                    max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens)
    return Server(engine, registry, tokenizer, limits, args.api_key or None)


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    server = build_server(args)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level == "debug")

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises the signal after its graceful shutdown; a drained server exits 0 instead."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    models = ", ".join(server.registry.model_names())
    print(f"deltatune serve: http://{args.host}:{args.port}/v1 (models: {models})", file=sys.stderr, flush=True)
    GracefulServer(config).run()
    return 0
