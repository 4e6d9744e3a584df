"""Pieces of ``deltatune serve`` checked in-process against independent references.

- The batch cache + mixed forward: rows of different adapters and lengths, joining and leaving between
  steps, give at every step the logits a plain full forward of that sequence alone gives.
- Top-p sampling keeps exactly the nucleus written out in the test.
- Streamed text holds back what could still become a stop string and never shows the stop string.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch

import deltatune as dt
from deltatune.serve.batch_cache import BatchCache
from deltatune.serve.mixed_forward import BASE, prefill_rows, step_rows
from deltatune.serve.sampling import SamplingParams, make_generator, pick_token
from deltatune.serve.text import TextTracker


def _two_adapter_model(make_model: Any) -> dt.DeltaModel:
    model = dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapters: each changes the logits
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + (1.0 if "ia3_" in name else 0.0))
    return model.eval()


def _alone(model: dt.DeltaModel, name: str, tokens: list[int]) -> torch.Tensor:
    """Reference: last-position logits of one full forward of ``tokens`` with adapter ``name`` (no cache)."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        if name == BASE:
            with model.disable_adapter():
                return model(input_ids=ids).logits[0, -1]
        model.set_adapter(name)
        return model(input_ids=ids).logits[0, -1]


def test_batch_rows_joining_and_leaving_equal_each_sequence_alone(make_model: Any) -> None:
    model = _two_adapter_model(make_model)
    gen = torch.Generator().manual_seed(1)
    batch, names, seqs = BatchCache(), [], []
    calls: list[int] = []
    model.base_model.register_forward_hook(lambda *_: calls.append(1))

    def join(*newcomers: tuple[str, int]) -> None:
        """Prefill the newcomers in one left-padded forward (one row per adapter name) and add them."""
        prompts = [torch.randint(1, 100, (length,), generator=gen).tolist() for _, length in newcomers]
        inputs = BatchCache.prefill_inputs(prompts)
        logits, tensors, mask = prefill_rows(model, [name for name, _ in newcomers], inputs)
        for row, ((name, _), prompt) in enumerate(zip(newcomers, prompts)):
            torch.testing.assert_close(logits[row], _alone(model, name, prompt), atol=1e-4, rtol=1e-4)
            names.append(name)
            seqs.append(prompt + [int(logits[row].argmax())])
        batch.join(tensors, mask)

    def step() -> None:
        calls.clear()
        logits, tensors = step_rows(model, names, batch.step_inputs([s[-1] for s in seqs]), batch.tensors)
        assert len(calls) == 1  # one forward of the causal LM for every row, whatever the adapter mix
        batch.advance(tensors)
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], _alone(model, names[row], seq), atol=1e-4, rtol=1e-4)
            seq.append(int(logits[row].argmax()))

    join(("a", 5), (BASE, 3), ("b", 7))
    step()
    step()
    batch.keep([0, 2])  # the base sequence leaves
    del names[1], seqs[1]
    join(("b", 11), ("a", 2))  # a longer newcomer: the batch is padded to its width
    step()
    batch.keep([1, 2, 3])  # the oldest leaves: its leading columns go
    del names[0], seqs[0]
    step()
    assert batch.mask.shape == (3, 11 + 2) and batch.mask[:, 0].any()  # the 11-token newcomer, 2 steps on


def test_top_p_samples_only_from_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=3)
    gen = make_generator(params, 0)
    counts = collections.Counter(pick_token(probs.log(), params, gen) for _ in range(3000))
    # nucleus: 0.5 (token 1), then 0.3 (token 3) reaches 0.8 >= 0.7; renormalised 0.625 / 0.375
    assert set(counts) == {1, 3}
    assert counts[1] / 3000 == pytest.approx(0.625, abs=0.04)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert pick_token(probs.log(), greedy, make_generator(greedy, 0)) == 1


class _PieceTokenizer:
    """Token id i decodes to ``pieces[i]``."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_streamed_text_holds_back_a_possible_stop_string() -> None:
    tracker = TextTracker(_PieceTokenizer(["Hel", "lo", " W", "orld", "!"]), stop=["o Wx", "ld!"])
    out = [tracker.push(0), tracker.push(1), tracker.push(2), tracker.push(3), tracker.push(4)]
    # "Hel": "l" may start "ld!", held; "Hello": "o" may start "o Wx"; "Hello W": "o W" held;
    # "Hello World": "ld" held; "!" completes "ld!"
    assert out == ["He", "ll", "", "o Wor", ""]
    assert tracker.stopped and tracker.text == "Hello Wor" and tracker.finish() == ""
    plain = TextTracker(_PieceTokenizer(["a", "\ufffd", "b"]), stop=[])
    assert [plain.push(0), plain.push(1)] == ["a", ""]  # an incomplete character waits


def test_serve_refuses_bad_options_before_loading_anything(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    from deltatune.cli import main

    missing_model = str(tmp_path / "no-model")  # never reached: the options are checked first
    for args, words in ((["--adapter", "support"], "expected NAME=PATH"),
                        (["--adapter", f"x={tmp_path / 'nope'}"], "no such folder"),
                        (["--adapters-dir", str(tmp_path / "nope")], "is not a directory"),
                        (["--max-batch", "0"], "--max-batch must be at least 1")):
        assert main(["serve", "--model", missing_model, *args]) == 2
        assert words in capsys.readouterr().err


def test_virtual_token_and_prefix_rows_share_steps_with_layer_rows(make_model: Any) -> None:
    """Prompt tuning, P-tuning and prefix tuning rows: prefilled per input family (what the adapter puts in
    front enters the row's cache), then decoded in ONE forward with LoRA / IA3 / base rows; every step's
    logits equal a plain forward of that sequence alone with its adapter (the solo path, no cache)."""
    from deltatune.serve.mixed_forward import prefill_groups

    model = _two_adapter_model(make_model)
    model.add_adapter("p", dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model.add_adapter("t", dt.PTuningConfig(num_virtual_tokens=2, encoder_hidden_size=16, task_type="CAUSAL_LM"))
    model.add_adapter("x", dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero virtual tokens / prefixes of a clear size
        for name, param in model.named_parameters():
            if "input_deltas" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.eval()
    names = ["x", "a", "p", BASE, "t", "b", "x"]
    lengths = [5, 3, 6, 4, 2, 7, 3]
    groups = prefill_groups(model, names)
    assert sorted(i for group in groups for i in group) == list(range(len(names))) and len(groups) == 2
    assert {names[i] for i in groups[0]} >= {"x"} and {names[i] for i in groups[1]} == {"p", "t"}
    calls: list[int] = []
    model.base_model.register_forward_hook(lambda *_: calls.append(1))
    batch, order, seqs = BatchCache(), [], []
    for group in groups:
        prompts = [torch.randint(1, 100, (lengths[i],), generator=gen).tolist() for i in group]
        inputs = BatchCache.prefill_inputs(prompts)
        logits, tensors, mask = prefill_rows(model, [names[i] for i in group], inputs)
        for row, i in enumerate(group):
            torch.testing.assert_close(logits[row], _alone(model, names[i], prompts[row]), atol=1e-4, rtol=1e-4)
            order.append(names[i])
            seqs.append(prompts[row] + [int(logits[row].argmax())])
        batch.join(tensors, mask)
    in_front = {"x": 4, "p": 3, "t": 2}  # virtual tokens / prefix positions, as configured above
    assert batch.positions.tolist() == [len(s) - 1 + in_front.get(n, 0) for n, s in zip(order, seqs)]
    for _ in range(3):
        calls.clear()
        logits, tensors = step_rows(model, order, batch.step_inputs([s[-1] for s in seqs]), batch.tensors)
        assert len(calls) == 1  # every kind of adapter in one forward of the causal LM
        batch.advance(tensors)
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], _alone(model, order[row], seq), atol=1e-4, rtol=1e-4)
            seq.append(int(logits[row].argmax()))
        keep = [r for r in range(len(seqs)) if order[r] != "p"]  # the prompt-tuning row leaves after a step
        batch.keep(keep)
        order, seqs = [order[r] for r in keep], [seqs[r] for r in keep]


class _NumberTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def test_engine_prefills_newcomers_in_chunks_and_each_answer_equals_generate(
    make_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from deltatune.serve.adapters import AdapterRegistry
    from deltatune.serve.engine import Engine, Event, Job

    model = make_model("llama_lm")
    chunks: list[int] = []
    real = BatchCache.prefill_inputs
    monkeypatch.setattr(BatchCache, "prefill_inputs",
                        staticmethod(lambda prompts, pad_id=0: chunks.append(sum(map(len, prompts))) or real(prompts)))
    engine = Engine(AdapterRegistry(model, "tiny"), _NumberTokenizer(), eos_ids=set(), max_batch=8,
                    max_prefill_tokens=10)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 100, (6,), generator=gen).tolist() for _ in range(4)]
    texts, done = ["" for _ in prompts], threading.Semaphore(0)

    def emitter(i: int) -> Any:
        def emit(event: Event) -> None:
            texts[i] += event.text
            if event.kind != "text":
                done.release()
        return emit

    jobs = [Job(BASE, p, SamplingParams(max_tokens=5), 1, emitter(i)) for i, p in enumerate(prompts)]
    for job in jobs:  # queued before the loop starts: the first turn sees all four
        engine.submit(job)
    engine.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert chunks == [6, 6, 6, 6]  # 12 > 10 tokens: one 6-token prompt per turn
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert text == "".join(f" {i}" for i in out[0, 6:].tolist())


def test_an_adapter_the_mixed_batch_refuses_is_refused_at_load_with_the_reason(
    make_model: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server asks the mixed-batch path, not a list of methods: a layer that cannot route rows (here LoRA's,
    patched to say so) makes the load a 400 carrying the core's reason, and the adapter is unloaded again."""
    from deltatune.layer import DeltaLayer
    from deltatune.serve.adapters import AdapterRegistry
    from deltatune.serve.errors import ApiError

    folder = tmp_path / "lora"
    dt.get_delta_model(make_model("llama_lm"), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                             task_type="CAUSAL_LM")).save_pretrained(folder)
    registry = AdapterRegistry(make_model("llama_lm"), "tiny")
    monkeypatch.setattr(DeltaLayer, "serves_mixed_batches", property(lambda self: False))
    with pytest.raises(ApiError) as info:
        registry.load("l", folder)
    assert info.value.status == 400
    assert "cannot be served" in info.value.message and "cannot share a mixed-adapter batch" in info.value.message
    assert registry.names == [] and "l" not in registry.model.peft_config
    monkeypatch.undo()
    registry.load("l", folder)  # the same folder loads once the path takes it
    assert registry.names == ["l"]


def test_served_model_name_names_the_base_and_lora_modules_add_adapters(tmp_path: Any) -> None:
    """vLLM's --served-model-name and --lora-modules: the base answers to that name, the adapters to theirs."""
    from _tiny_lm import save_tiny_lm
    from transformers import AutoModelForCausalLM

    from deltatune.cli import build_parser
    from deltatune.serve.server import build_server

    base = save_tiny_lm(tmp_path / "tiny-lm")
    dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(
        r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "a")
    args = build_parser().parse_args(["serve", "--model", str(base), "--served-model-name", "my-llm",
                                      "--lora-modules", f"x={tmp_path / 'a'}", f"y={tmp_path / 'a'}"])
    assert build_server(args).registry.model_names() == ["my-llm", "x", "y"]
    args = build_parser().parse_args(["serve", "--model", str(base)])
    assert build_server(args).registry.model_names() == ["tiny-lm"]
