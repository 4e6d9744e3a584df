"""``deltatune serve`` with input-method adapters (prompt tuning, P-tuning, prefix tuning) and OFT / LN-tuning
adapters next to LoRA and the base, and unloading an adapter that is busy (draining). A real server process,
the official ``openai`` client.

The reference for every greedy answer is ``generate`` with that one adapter set, one prompt at a time in
this test process: the solo path of each method (virtual tokens prepended to the input embeddings, a
prefix cache), no server code. The server prefills each input family apart and decodes every row in one
forward per step, so equal texts show the virtual tokens / prefixes entered each row's cache slot at
the solo positions. Every adapter has NON-ZERO random weights (it changes the answers: checked).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx
from _serve_world import ServerProcess, build_adapter, build_base, load_base, reference_generate, start_server

PROMPTS = ["The quick brown fox", "Once upon a time", "Paris is the capital of"]
VIRTUAL = {"prompt": 5, "ptune": 3, "prefix": 6}  # the adapters' num_virtual_tokens
SERVED = ("lora", "prompt", "ptune", "prefix", "oft", "ln")  # loaded at start (lora2 is loaded at run time)


def _random_adapter(base: Path, out: Path, config: Any, seed: int) -> Path:
    """An adapter whose trainable tensors are moved away from their init (as after training): virtual tokens,
    prefixes, OFT rotations (identity at init), LayerNorm scales and shifts."""
    import deltatune as dt

    model = dt.get_delta_model(load_base(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out


class World:
    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer

        import deltatune as dt

        self.base = build_base(root / "base", seed=0)
        self.adapters = root / "adapters"
        build_adapter(self.base, self.adapters / "lora", seed=1)
        build_adapter(self.base, self.adapters / "lora2", seed=2, targets=("k_proj", "o_proj"))
        configs = {"prompt": dt.PromptTuningConfig(num_virtual_tokens=VIRTUAL["prompt"], task_type="CAUSAL_LM"),
                   "ptune": dt.PTuningConfig(num_virtual_tokens=VIRTUAL["ptune"], encoder_hidden_size=16,
                                             task_type="CAUSAL_LM"),
                   "prefix": dt.PrefixTuningConfig(num_virtual_tokens=VIRTUAL["prefix"], task_type="CAUSAL_LM"),
                   "oft": dt.OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                       task_type="CAUSAL_LM"),
                   "ln": dt.LNTuningConfig(task_type="CAUSAL_LM")}
        for seed, (name, config) in enumerate(configs.items(), start=3):
            _random_adapter(self.base, self.adapters / name, config, seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        model = dt.DeltaModel.from_pretrained(load_base(self.base), self.adapters / "lora", adapter_name="lora")
        for name in ("lora2", *configs):
            model.load_adapter(self.adapters / name, name)
        self.model = model.eval()

    def reference(self, model: str, prompt: str, max_tokens: int) -> str:
        ids = self.tokenizer(prompt)["input_ids"]
        if model == "base":
            with self.model.disable_adapter():
                out = reference_generate(self.model, ids, max_tokens)
        else:
            self.model.set_adapter(model)
            out = reference_generate(self.model, ids, max_tokens)
        return self.tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("serve_inputs"))


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    adapters = [f"--adapter={name}={world.adapters / name}" for name in SERVED]
    log = tmp_path_factory.mktemp("log") / "server.log"
    proc = start_server(["--model", str(world.base), *adapters, "--adapters-dir", str(world.adapters),
                         "--max-batch", "6", "--max-tokens-limit", "5000"], log)
    yield proc
    proc.stop()


def test_prompt_prefix_oft_and_ln_adapters_share_a_burst_with_lora_and_base(world: World, server: ServerProcess
                                                                             ) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["base", *SERVED]
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("prefix", "base", "oft", "prompt", "lora", "ln",
                                                                "ptune")]

    def ask(job: tuple[str, str]) -> Any:
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=10, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:  # 21 at once, 6 slots: newcomers of every kind join running rows
        answers = list(pool.map(ask, jobs))
    texts: dict[str, list[str]] = {}
    for (model, prompt), answer in zip(jobs, answers):
        assert answer.choices[0].text == world.reference(model, prompt, 10), (model, prompt)
        assert answer.usage.prompt_tokens == len(world.tokenizer(prompt)["input_ids"])  # no virtual tokens
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
        texts.setdefault(model, []).append(answer.choices[0].text)
    for name in SERVED:
        assert texts[name] != texts["base"], name  # every adapter changes the answers


def test_streamed_chat_with_a_prefix_adapter(world: World, server: ServerProcess) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about llamas."}]
    text = world.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = world.tokenizer(text, add_special_tokens=False)["input_ids"]
    world.model.set_adapter("prefix")
    expected = world.tokenizer.decode(reference_generate(world.model, ids, 8), skip_special_tokens=True)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="prefix", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == expected


def test_context_limit_counts_the_virtual_tokens(world: World, server: ServerProcess) -> None:
    """The tiny base has 4096 positions: a prompt + max_tokens 3 short of them fits the base (not sent: it would
    decode for long) but not an adapter whose virtual tokens take more than 3 (400 before any work)."""
    spare = 4096 - len(world.tokenizer("x")["input_ids"]) - 3
    for model in ("prompt", "prefix"):
        response = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": spare})
        assert response.status_code == 400, response.text
        assert f"the adapter's {VIRTUAL[model]} virtual positions" in response.json()["error"]["message"]


def test_unloading_a_busy_adapter_drains_it(world: World, server: ServerProcess) -> None:
    url = server.url + "/v1/adapters"
    assert httpx.post(url, json={"name": "lora2", "path": "lora2"}).status_code == 200
    client = server.client()
    expected = world.reference("lora2", "Once upon a time", 400)
    assert len(world.tokenizer(expected)["input_ids"]) > 300  # long enough to still run when the DELETE comes
    body = {"model": "lora2", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        deleted = httpx.delete(url + "/lora2")
        assert deleted.status_code == 202, deleted.text
        assert deleted.json() == {"object": "adapter", "id": "lora2", "deleted": False, "draining": True,
                                  "requests_in_flight": 1}
        assert httpx.get(server.url + "/health").json()["draining_adapters"] == ["lora2"]
        assert "lora2" not in [m.id for m in client.models.list().data]
        with pytest.raises(openai.NotFoundError, match="being unloaded"):
            client.completions.create(model="lora2", prompt="x", max_tokens=2)
        again = httpx.post(url, json={"name": "lora2", "path": "lora2"})
        assert again.status_code == 409 and "being unloaded" in again.text
        assert httpx.delete(url + "/lora2").status_code == 202  # asking again: still draining
        rest = [line for line in lines if line.startswith("data:")]
    chunks = [json.loads(line[5:]) for line in [first, *rest] if line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected  # finished in full
    for _ in range(100):
        if not httpx.get(server.url + "/health").json()["draining_adapters"]:
            break
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["draining_adapters"] == []
    assert httpx.delete(url + "/lora2").status_code == 404  # unloaded
    assert httpx.post(url, json={"name": "lora2", "path": "lora2"}).status_code == 200  # the name is free again
    assert client.completions.create(model="lora2", prompt="Paris", max_tokens=6, temperature=0).choices[0].text == \
        world.reference("lora2", "Paris", 6)
    assert httpx.delete(url + "/lora2").json()["deleted"] is True  # idle: unloaded at once
