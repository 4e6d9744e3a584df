"""Learning-rate check on the *validation* split (never the test split), used to pick the rates in
:mod:`bench.methods`. ``python -m bench.sweep --task trec --methods lora full --lrs 1e-3 3e-3``.
"""

from __future__ import annotations

import argparse
import json

from bench.runner import run_many


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="trec")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--lrs", nargs="+", type=float, required=True)
    parser.add_argument("--lib", default="deltatune")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--autocast", default="bf16", choices=["bf16", "fp32"], help="as the suites' accuracy runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    jobs = [
        {"kind": "classify", "model": "minilm", "method": m, "lib": args.lib, "task": args.task, "seeds": args.seeds,
         "n_train": args.n_train, "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
         "lr": lr, "eval_split": "validation", "save": False,
         "autocast": None if args.autocast == "fp32" else args.autocast}
        for m in args.methods for lr in args.lrs
    ]
    for job, res in zip(jobs, run_many(jobs, workers=args.workers, threads=1)):
        accs = [r.get("accuracy") for r in res.get("runs", [])]
        print(json.dumps({"method": job["method"], "lr": job["lr"], "epochs": args.epochs, "val_acc": accs,
                          "loss": [round(r["final_loss"], 3) for r in res.get("runs", [])], "error": res.get("error")}))


if __name__ == "__main__":
    main()
