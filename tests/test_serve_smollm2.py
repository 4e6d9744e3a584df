"""``deltatune serve`` on the bundled SmolLM2 with two adapters trained by ``deltatune train``.

Both adapters (LoRA and IA3) and the base answer one concurrent burst of chat requests; each greedy
answer must equal what ``deltatune generate`` prints for the same adapter and prompt.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from _serve_world import start_server

from deltatune.cli import main

PROMPTS = ["What is 3 plus 3?", "Name a colour."]


def _train(out: Path, data: Path, method: str, seed: int) -> Path:
    assert main(["train", "--model", "smollm2", "--data", str(data), "--method", method, "--max-steps", "1",
                 "--batch-size", "4", "--max-length", "40", "--lr", "3e-2", "--seed", str(seed), "--threads", "1",
                 "--max-eval-examples", "2", "--quiet", "--output-dir", str(out)]) == 0
    return out


@pytest.mark.integration
def test_smollm2_two_trained_adapters_and_the_base_equal_deltatune_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(12)))
    runs = {"lora": _train(tmp_path / "lora", data, "lora", 1), "ia3": _train(tmp_path / "ia3", data, "ia3", 2)}
    capsys.readouterr()
    expected: dict[tuple[str, str], str] = {}
    for name, run in [*runs.items(), ("smollm2", None)]:
        args = ["generate", *([str(run)] if run else ["--model", "smollm2"]), "--max-new-tokens", "12", "--json"]
        assert main([*args, *[arg for p in PROMPTS for arg in ("--prompt", p)]]) == 0
        for line in capsys.readouterr().out.splitlines():
            item = json.loads(line)
            expected[(name, item["prompt"])] = item["response"]

    server = start_server(["--model", "smollm2", "--adapter", f"lora={runs['lora']}", "--adapter",
                           f"ia3={runs['ia3']}"], tmp_path / "server.log")
    try:
        client = server.client()
        jobs = list(expected)
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: client.chat.completions.create(
                model=job[0], messages=[{"role": "user", "content": job[1]}], max_tokens=12, temperature=0), jobs))
        for job, answer in zip(jobs, answers):
            assert answer.choices[0].message.content.strip() == expected[job], job
    finally:
        server.stop()
    assert server.proc.returncode == 0
