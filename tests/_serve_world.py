"""Helpers for the ``deltatune serve`` tests: a tiny base model folder, adapters, real server processes.

The base is a random-init 2-layer Llama saved with the bundled SmolLM2 tokenizer (offline), so the
chat template, special tokens and byte-level BPE are real while a forward takes a millisecond. The
adapters are LoRA adapters with NON-ZERO random weights, so each one changes what the model says.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


def build_base(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama causal LM + the SmolLM2 tokenizer in ``folder``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.bundled import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits: greedy answers vary with the adapter, and ties stay unlikely
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_base(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def build_adapter(base_folder: Path, out: Path, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter of the base in ``base_folder`` with random non-zero A and B, saved to ``out``."""
    import deltatune as dt

    model = dt.get_delta_model(load_base(base_folder), dt.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                                     task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``deltatune serve`` process on a loopback port."""

    proc: subprocess.Popen
    port: int
    api_key: str | None
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(args: list[str], log: Path, api_key: str | None = None, runner: list[str] | None = None,
                 timeout: float = 90.0) -> ServerProcess:
    """Start ``deltatune serve ARGS`` (or ``runner`` + ARGS) and wait until ``/health`` answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = (runner or [sys.executable, "-m", "deltatune"]) + ["serve", *args, "--port", str(port), "--threads", "1"]
    if api_key:
        command += ["--api-key", api_key]
    handle = open(log, "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ServerProcess(proc, port, api_key, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not start in {timeout} s:\n{server.output()}")


def reference_generate(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ``generate`` of one prompt (batch of one, no padding): the tokens the server must match."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist()
