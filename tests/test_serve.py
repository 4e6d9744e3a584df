"""``deltatune serve`` driven as a real process over loopback with the official ``openai`` client.

The reference for every greedy answer is transformers' ``generate`` on the same adapter, one prompt at
a time in this test process (no server code involved). The server decodes the same prompts batched
across adapters, so equal texts show the per-row routing, the left-padded batch cache and the
sampling are right. Tiny random Llama + the real SmolLM2 tokenizer (see ``_serve_world``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx
from _serve_world import (
    ServerProcess,
    build_adapter,
    build_base,
    load_base,
    reference_generate,
    start_server,
)

KEY = "test-key-123"
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Paris is the capital of"]


class World:
    """Base folder, adapters dir (a1, a2, a3), an adapter of another base, and reference models."""

    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer

        import deltatune as dt

        self.base = build_base(root / "base", seed=0)
        self.adapters = root / "adapters"
        build_adapter(self.base, self.adapters / "a1", seed=1)
        build_adapter(self.base, self.adapters / "a2", seed=2, targets=("q_proj", "o_proj", "down_proj"))
        build_adapter(self.base, self.adapters / "a3", seed=3, targets=("k_proj", "up_proj"))
        other = build_base(root / "other_base", seed=5)
        build_adapter(other, self.adapters / "foreign", seed=4)
        outside = build_adapter(self.base, root / "outside", seed=6)
        (self.adapters / "escape").symlink_to(outside, target_is_directory=True)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        model = dt.DeltaModel.from_pretrained(load_base(self.base), self.adapters / "a1", adapter_name="a1")
        model.load_adapter(self.adapters / "a2", "a2")
        model.load_adapter(self.adapters / "a3", "a3")
        self.model = model.eval()

    def reference(self, model: str, prompt_ids: list[int], max_tokens: int) -> str:
        """Greedy text of ``generate`` with adapter ``model`` ("base": none), as the server should answer."""
        if model == "base":
            with self.model.disable_adapter():
                ids = reference_generate(self.model, prompt_ids, max_tokens)
        else:
            self.model.set_adapter(model)
            ids = reference_generate(self.model, prompt_ids, max_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def completion_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def chat_ids(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("serve"))


FAULTY_RUNNER = Path(__file__).with_name("_serve_faulty.py")


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module (started through a runner whose forward fails for adapter "boom")."""
    import sys

    log = tmp_path_factory.mktemp("log") / "server.log"
    proc = start_server(["--model", str(world.base), "--adapter", f"a1={world.adapters / 'a1'}",
                         "--adapter", f"a2={world.adapters / 'a2'}", "--adapter", f"boom={world.adapters / 'a2'}",
                         "--adapters-dir", str(world.adapters), "--max-batch", "4", "--max-queue", "12",
                         "--max-tokens-limit", "3000", "--max-prompt-tokens", "200", "--max-body-bytes", "65536",
                         "--shutdown-timeout", "20"], log, api_key=KEY, runner=[sys.executable, str(FAULTY_RUNNER)])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return server.client()


def test_models_lists_the_base_and_every_adapter(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["base", "a1", "a2", "boom"]


def test_burst_over_two_adapters_and_the_base_equals_generate(world: World, client: Any, server: ServerProcess) -> None:
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("base", "a1", "a2")]

    def ask(job: tuple[str, str]) -> Any:
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as pool:  # all sent at once: 4 slots, the rest queue; steps mix adapters
        answers = list(pool.map(ask, jobs))
    for (model, prompt), answer in zip(jobs, answers):
        ids = world.completion_ids(prompt)
        assert answer.choices[0].text == world.reference(model, ids, 12), (model, prompt)
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.usage.completion_tokens == 12 or answer.choices[0].finish_reason == "stop"
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    by_model = {m: [a.choices[0].text for (mm, _), a in zip(jobs, answers) if mm == m] for m in ("base", "a1", "a2")}
    assert by_model["base"] != by_model["a1"] != by_model["a2"] != by_model["base"]  # the adapters matter


def test_chat_uses_the_template_and_streams_the_same_text(world: World, client: Any) -> None:
    messages = [{"role": "user", "content": "Tell me about llamas."}]
    whole = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0)
    expected = world.reference("a2", world.chat_ids("Tell me about llamas."), 10)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(world.chat_ids("Tell me about llamas."))
    pieces, usage, reasons = [], None, []
    for part in client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0,
                                               stream=True):
        usage = part.usage or usage
        for choice in part.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == expected and len(pieces) > 2
    assert reasons[-1] in ("length", "stop") and usage.total_tokens == whole.usage.total_tokens


def test_streamed_completion_with_n_choices(world: World, client: Any) -> None:
    texts: dict[int, str] = {0: "", 1: ""}
    for part in client.completions.create(model="a1", prompt="Once upon a time", max_tokens=8, temperature=0, n=2,
                                          stream=True):
        for choice in part.choices:
            texts[choice.index] += choice.text
    expected = world.reference("a1", world.completion_ids("Once upon a time"), 8)
    assert texts == {0: expected, 1: expected}


def test_sampling_with_a_seed_repeats_and_choices_differ(client: Any) -> None:
    def ask() -> list[str]:
        out = client.completions.create(model="a1", prompt="def main():", max_tokens=10, temperature=1.5, top_p=0.95,
                                        n=3, seed=11)
        return [c.text for c in out.choices]

    first = ask()
    assert len(first) == 3 and len(set(first)) > 1
    assert ask() == first


def test_stop_string_cuts_the_text(world: World, client: Any) -> None:
    full = world.reference("base", world.completion_ids("The quick brown fox"), 12)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    answer = client.completions.create(model="base", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                       stop=[stop])
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The quick brown fox", max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


def test_api_key_is_required_except_for_health(server: ServerProcess) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    response = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_unknown_model_is_404_listing_the_loaded_ones(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "base, a1, a2, boom" in str(info.value)


def test_limits_and_bad_input_get_json_errors(server: ServerProcess) -> None:
    def post(body: Any, raw: bytes | None = None) -> httpx.Response:
        return httpx.post(server.url + "/v1/completions", headers=server.headers(),
                          **({"content": raw} if raw is not None else {"json": body}))

    cases = [
        (post(None, raw=b"{not json"), 400, "not valid JSON"),
        (post({"model": "base", "prompt": "x " * 40000}), 413, "limit of 65536 bytes"),
        (post({"model": "base", "prompt": "word " * 300}), 400, "at most 200"),
        (post({"model": "base", "prompt": "x", "max_tokens": 5000}), 400, "limit of 3000"),
        (post({"model": "base", "prompt": "x", "n": 50}), 400, "limit of 4"),  # --max-n is capped by --max-batch
        (post({"model": "base", "prompt": "x", "temperature": 5}), 400, "temperature"),
        (post({"model": "base"}), 400, "prompt"),
        (post({"model": "base", "prompt": "x", "logprobs": 3}), 400, "'logprobs' is not supported"),
        (post([1, 2]), 400, "Invalid request"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"], response.text
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_adapters_load_and_unload_at_run_time(world: World, server: ServerProcess, client: Any) -> None:
    url, headers = server.url + "/v1/adapters", server.headers()
    response = httpx.post(url, headers=headers, json={"name": "a3", "path": "a3"})
    assert response.status_code == 200, response.text
    assert "a3" in [m.id for m in client.models.list().data]
    answer = client.completions.create(model="a3", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert answer.choices[0].text == world.reference("a3", world.completion_ids("Once upon a time"), 8)
    assert httpx.post(url, headers=headers, json={"name": "a3", "path": "a3"}).status_code == 409
    assert httpx.delete(url + "/a3", headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a3", prompt="x", max_tokens=2)
    assert httpx.delete(url + "/a3", headers=headers).status_code == 404


def test_vllm_runtime_lora_routes(world: World, server: ServerProcess, client: Any) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter bodies do what /v1/adapters does."""
    headers = server.headers()
    response = httpx.post(server.url + "/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": "v3", "lora_path": "a3"})
    assert response.status_code == 200, response.text
    answer = client.completions.create(model="v3", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert answer.choices[0].text == world.reference("a3", world.completion_ids("Once upon a time"), 8)
    response = httpx.post(server.url + "/v1/load_lora_adapter", headers=headers, json={"lora_name": "v4",
                                                                                      "lora_path": "/etc"})
    assert response.status_code == 400 and "must be relative" in response.json()["error"]["message"]
    unload = server.url + "/v1/unload_lora_adapter"
    assert httpx.post(unload, headers=headers, json={"lora_name": "v3"}).status_code == 200
    assert "v3" not in [m.id for m in client.models.list().data]
    assert httpx.post(unload, headers=headers, json={"lora_name": "v3"}).status_code == 404


@pytest.mark.parametrize("path, status, words", [
    ("../base", 400, "without '..'"),
    ("a1/../../base", 400, "without '..'"),
    ("/etc", 400, "must be relative"),
    ("escape", 400, "outside the adapters directory"),
    ("missing", 404, "No adapter folder"),
    ("foreign", 400, "different base model"),
])
def test_adapter_paths_outside_the_dir_and_foreign_bases_are_refused(
    server: ServerProcess, path: str, status: int, words: str
) -> None:
    response = httpx.post(server.url + "/v1/adapters", headers=server.headers(), json={"name": "x", "path": path})
    assert response.status_code == status and words in response.json()["error"]["message"], response.text


def _wait_for(server: ServerProcess, key: str, value: int, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if httpx.get(server.url + "/health").json()[key] == value:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{key} did not reach {value}: {httpx.get(server.url + '/health').json()}")


def test_a_client_leaving_mid_stream_frees_its_slot(server: ServerProcess) -> None:
    body = {"model": "a1", "prompt": "Once upon a time", "max_tokens": 2500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers(), json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert httpx.get(server.url + "/health").json()["running_sequences"] == 1
    # closed after the first chunk: 2,500 tokens would take far longer than the wait below
    assert _wait_for(server, "running_sequences", 0, timeout=5.0) < 5.0


# -- faults, a full queue and SIGTERM (last: it stops the server) ---------------------------------------
def test_a_failing_request_gets_500_and_the_others_finish(world: World, server: ServerProcess) -> None:
    client = server.client()
    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(client.completions.create, model="a1", prompt="Once upon a time", max_tokens=200,
                           temperature=0)
        _wait_for(server, "running_sequences", 1)
        bad = pool.submit(client.completions.create, model="boom", prompt="Once upon a time", max_tokens=50,
                          temperature=0)
        with pytest.raises(openai.InternalServerError) as info:
            bad.result()
        assert "injected fault" in str(info.value)
        with pytest.raises(openai.APIError, match="injected fault"):  # streamed: an error event ends the stream
            for _ in client.completions.create(model="boom", prompt="Paris", max_tokens=50, temperature=0,
                                               stream=True):
                pass
        assert good.result().choices[0].text == world.reference("a1", world.completion_ids("Once upon a time"), 200)
    assert client.completions.create(model="a1", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_a_full_queue_answers_429(server: ServerProcess) -> None:
    body = {"model": "a1", "prompt": "Once upon a time", "max_tokens": 2500, "temperature": 0, "stream": True}
    streams = []
    with httpx.Client(headers=server.headers(), timeout=30) as http:
        try:
            for i in range(16):  # 4 slots, then 12 waiting
                request = http.build_request("POST", server.url + "/v1/completions", json=body)
                streams.append(http.send(request, stream=True))
                _wait_for(server, "running_sequences" if i < 4 else "waiting_requests", i + 1 if i < 4 else i - 3)
            with pytest.raises(openai.RateLimitError):
                server.client().completions.create(model="a1", prompt="x", max_tokens=2)
        finally:
            for response in streams:
                response.close()
    _wait_for(server, "running_sequences", 0)
    _wait_for(server, "waiting_requests", 0)


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(world: World, server: ServerProcess) -> None:
    client = server.client()
    jobs = (("a1", "Once upon a time"), ("base", "def main():"), ("a2", "Paris"))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.completions.create, model=m, prompt=p, max_tokens=200, temperature=0)
                   for m, p in jobs]
        _wait_for(server, "running_sequences", 3)
        server.proc.send_signal(15)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # new connections are refused at once...
            try:
                httpx.get(server.url + "/health", timeout=1)
                time.sleep(0.05)
            except httpx.ConnectError:
                break
        assert not all(f.done() for f in futures)  # ...while the requests in flight still run
        answers = [f.result() for f in futures]
    for (m, p), answer in zip(jobs, answers):
        assert answer.choices[0].text == world.reference(m, world.completion_ids(p), 200)
        assert answer.usage.completion_tokens == 200 or answer.choices[0].finish_reason == "stop"
    assert server.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
