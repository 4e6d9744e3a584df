"""Load generator for ``deltatune serve``: throughput and latency over clients x adapters, vs one at a time.

Bounded and local: it starts its own server on a free 127.0.0.1 port with ``--adapters`` LoRA adapters
of SmolLM2 (random non-zero weights, r=8 on q/v: what serving costs does not depend on training),
sends a fixed number of streamed chat requests per setting, then stops the server. For each number
of concurrent clients (``--clients``) and of adapters the requests are spread over (``--spread``) it
prints tokens/s, p50/p95 latency and p50 time to first token; the 1-client row of each spread is the
one-at-a-time baseline the throughput ratio is taken against (same run, same server).

    python -m bench.serve_load                                   # 1/8/32 clients x 1/4/8 adapters, 64 tokens
    python -m bench.serve_load --requests 16 --max-tokens 16     # a short run

Targets (issue 13): >= 3x the one-at-a-time throughput at 32 clients; 8 adapters at most 1.2x slower
than 1 adapter at the same load; zero failed requests. Results: bench/results/serve.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUESTIONS = ["Tell me a short story about a cat.", "What is the capital of France?", "Give me three colours.",
             "How do I boil an egg?", "Name a famous painter.", "Why is the sky blue?", "Write a haiku about rain.",
             "What is two plus two?"]


def make_adapters(folder: Path, count: int) -> list[Path]:
    """``count`` LoRA adapters of SmolLM2 with random non-zero weights (seeded, one per index)."""
    import torch
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.bundled import resolve_model_path

    paths = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2"), dtype=torch.float32)
        model = dt.get_delta_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        model.save_pretrained(folder / f"a{i}")
        paths.append(folder / f"a{i}")
    return paths


def start(paths: list[Path], port: int, max_batch: int, threads: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "deltatune", "serve", "--model", "smollm2", "--host", "127.0.0.1", "--port",
            str(port), "--max-batch", str(max_batch), "--threads", str(threads)]
    for path in paths:
        args += ["--adapter", f"{path.name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("server did not start")


async def one_request(http: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    """One streamed chat request: latency, time to first token, tokens (from the usage chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"ok": False, "status": 500}
            if first is None and any(c.get("delta", {}).get("content") for c in data["choices"]):
                first = time.perf_counter() - start
            tokens = (data.get("usage") or {}).get("completion_tokens", tokens)
    return {"ok": True, "latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


async def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """``requests`` requests, round-robin over ``models``, with ``clients`` in flight at a time."""
    todo = list(range(requests))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop(0)
            results.append(await one_request(http, url, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)],
                                             max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in ok) or [0.0]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "adapters": len(models), "requests": requests, "failed": len(results) - len(ok),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(lat), "p95_latency_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "p50_ttft_s": statistics.median([r["ttft"] for r in ok] or [0.0])}


def report(rows: list[dict], settings: dict) -> str:
    base = {r["adapters"]: r["tokens_per_s"] for r in rows if r["clients"] == 1}
    one_adapter = {r["clients"]: r["tokens_per_s"] for r in rows if r["adapters"] == 1}
    lines = [("| clients | adapters | requests | failed | tokens/s | x one-at-a-time | slowdown vs 1 adapter | "
             "p50 latency s | p95 latency s | p50 TTFT s |"), "|" + "---|" * 10]
    for r in rows:
        speedup = f"{r['tokens_per_s'] / base[r['adapters']]:.2f}" if base.get(r["adapters"]) else "-"
        slowdown = f"{one_adapter[r['clients']] / r['tokens_per_s']:.2f}" if one_adapter.get(r["clients"]) else "-"
        lines.append(f"| {r['clients']} | {r['adapters']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} "
                     f"| {speedup} | {slowdown} | {r['p50_latency_s']:.2f} | {r['p95_latency_s']:.2f} "
                     f"| {r['p50_ttft_s']:.2f} |")
    head = (f"deltatune serve on SmolLM2-135M, {settings['max_tokens']} new tokens per request, greedy, "
            f"--max-batch {settings['max_batch']}, {settings['threads']} torch thread(s), {platform.processor() or platform.machine()}")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--spread", type=int, nargs="+", default=[1, 4, 8], help="adapters the requests go to")
    parser.add_argument("--requests", type=int, default=64, help="requests per setting")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="serve", help="results file stem in bench/results")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), max(args.spread))
        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = start(paths, port, args.max_batch, args.threads, Path(tmp) / "server.log")
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(load(url, [paths[0].name], 2, 2, 4))  # warm-up
            for spread in args.spread:
                for clients in args.clients:
                    row = asyncio.run(load(url, [p.name for p in paths[:spread]], clients, args.requests,
                                           args.max_tokens))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    settings = {k: getattr(args, k) for k in ("max_tokens", "max_batch", "threads", "requests")}
    text = report(rows, settings)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(text)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
