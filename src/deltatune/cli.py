"""The ``deltatune`` command: train, eval, predict, generate, merge, inspect, export, demo, serve.

Run ``deltatune <command> --help`` for every option. Nothing here downloads: models are bundled names
(``minilm``, ``smollm2``) or local folders. This module runs a parsed command (one handler per subcommand,
most of them thin: the work is in :mod:`deltatune.commands`); the options themselves are defined in
:mod:`deltatune.cli_parser`, whose :func:`build_parser` is re-exported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

from .cli_parser import build_parser
from .errors import DeltaError
from .integrations.peft_identity import without_peft_identity

__all__ = ["COMMANDS", "build_parser", "main"]


# -- running the commands ------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    from .registry import all_methods
    from .train.jobs import read_job_file
    from .train.loop import train
    from .train.options import build_options, parse_method_opt, read_yaml

    if args.list_methods:
        for spec in all_methods():
            fields = [f.name for f in dataclasses.fields(spec.config_cls) if f.init]
            print(f"{spec.name:<16} {spec.kind:<6} options: {', '.join(fields)}")
            recipe = getattr(spec.config_cls, "RECOMMENDED_OPTIONS", None)
            if recipe is not None:  # what 'deltatune train' uses when given no --method-opt (and no --lr)
                opts = " ".join(f"{k}={v}" for k, v in recipe.items())
                lr, epochs = (getattr(spec.config_cls, f"RECOMMENDED_{n}", None) for n in ("LR", "EPOCHS"))
                print(f"{'':<23} default recipe: {opts}, lr={lr}" + (f", epochs={epochs}" if epochs else ""))
        return 0
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config", "method_opt", "list_methods")}
    cli["method_options"] = dict(parse_method_opt(text) for text in args.method_opt)
    plan = read_job_file(args.config) if args.config else None
    if plan is not None:  # a jobs: list: several adapters trained jointly on one base
        from .train.jobs import make_jobs
        from .train.multi_run import train_jobs

        train_jobs(make_jobs(*plan, cli=cli))
        return 0
    file_values = read_yaml(args.config) if args.config else {}
    train(build_options(file_values, cli))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .commands.inference import dumps, run_evaluation
    from .train.cpu import torch_threads

    columns = {f"{n}_column": getattr(args, f"{n}_column") for n in ("text", "label", "prompt", "response")}
    with torch_threads(args.threads):
        result = run_evaluation(args.adapter, args.model, args.data, args.split, args.task, args.batch_size,
                                args.max_examples, args.quantize, progress=not args.quiet,
                                quantize_embeddings=args.quantize_embeddings, **columns)
    if args.json:
        print(dumps(result))
        return 0
    what = f"adapter {result['adapter']}" if result["adapter"] else f"base model {result['model']}"
    print(f"{what} on {result['data']} [{result['split']}], {result['examples']} examples ({result['task']})")
    for key in ("accuracy", "macro_f1", "loss", "perplexity"):
        if key in result:
            print(f"  {key:<11} {result[key]:.4f}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from .commands.inference import load_for_inference, read_inputs, run_predict
    from .train.cpu import torch_threads

    texts = read_inputs(args.text, args.file, args.text_column)
    with torch_threads(args.threads):
        loaded = load_for_inference(args.adapter, args.model, quantize=args.quantize,
                                    quantize_embeddings=args.quantize_embeddings)
        items = run_predict(loaded, texts, args.batch_size)
    for item in items:
        if args.json:
            print(json.dumps(item))
        else:
            print(f"{item['label']}\t{item['probability']:.3f}\t{item['text']}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    from .commands.inference import load_for_inference, read_inputs, run_generate
    from .train.cpu import torch_threads

    prompts = read_inputs(args.prompt, args.file, args.text_column)
    task = args.task or (None if args.adapter else "instruct")
    with torch_threads(args.threads):
        loaded = load_for_inference(args.adapter, args.model, task, quantize=args.quantize,
                                    quantize_embeddings=args.quantize_embeddings)
        items = run_generate(loaded, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed)
    for item in items:
        print(json.dumps(item) if args.json else f">>> {item['prompt']}\n{item['response']}\n")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .commands.inference import run_merge

    out, report, float_embeddings = run_merge(args.adapter, args.output, args.model, args.dtype, args.quantize,
                                              args.quantize_embeddings)
    if report is not None:
        print(report)
    if float_embeddings:
        print(f"note: the quantized token embedding ({', '.join(float_embeddings)}; and the LM head tied to it) is "
              "written dequantized, in float (the same values: transformers has no format for its storage); "
              "the linear layers stay quantized. After loading it, deltatune.quant.quantize_embeddings(model, "
              "KIND) stores it quantized again, with the same codes.")
    print(f"merged model written to {out} (load it with transformers' AutoModel...from_pretrained)")
    return 0


def _combine(args: argparse.Namespace) -> int:
    from .commands.combine import run_combine

    out = run_combine(args.adapters, args.weights, args.out, args.combination_type, args.rank, args.density,
                      args.seed, args.majority_sign, args.model)
    print(f"combined adapter written to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .commands.inference import dumps, inspect_adapter

    report = inspect_adapter(args.adapter, args.base)
    status = 1 if report.get("base_matches") is False else 0  # a failed --base check fails the command
    if args.json:
        print(dumps(report))
        return status
    fp = report["fingerprint"] or {}
    lines = [
        f"adapter folder:   {report['folder']}",
        f"method:           {report['peft_type']}   task: {report['task']}",
        f"target_modules:   {report['target_modules']}",
        f"modules_to_save:  {report['modules_to_save']}",
        f"wrapped modules:  {len(report['wrapped_modules'])}" + (f" (e.g. {report['wrapped_modules'][0]})"
                                                                  if report["wrapped_modules"] else ""),
        f"trainable params: {report['trainable_params']:,} in {report['tensors']} tensors",
        f"size:             {report['weights_bytes']:,} bytes of weights, {report['folder_bytes']:,} in the folder",
        f"base model:       {report['base_model']}",
        "fingerprint:      " + (f"{fp.get('architecture')} ({fp.get('model_type')}), {fp.get('num_parameters'):,} "
                                f"base params, sha256 {str(fp.get('sha256'))[:16]}..." if fp else "none recorded"),
    ]
    if report.get("labels"):
        lines.append(f"labels:           {report['labels']}")
    if "base_matches" in report:
        verdict = {True: "MATCHES", False: "DOES NOT MATCH", None: "cannot be checked"}[report["base_matches"]]
        lines.append(f"base check:       {report['base_checked']} {verdict}"
                     + (f": {report['base_mismatch']}" if report["base_mismatch"] else ""))
    print("\n".join(lines))
    return status


def _export(args: argparse.Namespace) -> int:
    from .integrations.gguf_lora import export_gguf_lora

    out = export_gguf_lora(args.adapter, args.out, args.model)
    print(f"GGUF LoRA written to {out}; use it with llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .commands.demo import run_demo

    run_demo(output_dir=args.output_dir, max_train_examples=args.max_train_examples,
             max_eval_examples=args.max_eval_examples, max_steps=args.max_steps, epochs=args.epochs,
             threads=args.threads, quiet=args.quiet or None)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve.server import run_server

    return run_server(args)


COMMANDS = {"train": _train, "eval": _eval, "predict": _predict, "generate": _generate, "merge": _merge,
            "combine": _combine, "inspect": _inspect, "export": _export, "demo": _demo, "serve": _serve}


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # deltatune never downloads
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deltatune`` console script; returns the exit code (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        with without_peft_identity():  # its models never reach transformers' Trainer/TRL: no peft import for them
            return COMMANDS[args.command](args)
    except DeltaError as exc:
        print(f"deltatune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltatune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
