"""AdaLoRA under ``deltatune train --resume``: the rank budget's state (importance averages, kept masks)
is saved with each checkpoint, so a run stopped mid-way and resumed prunes the same triplets and ends
with the same adapter as the uninterrupted run. A control resumes the same checkpoint with the state
dropped (what happened before it was saved) and must end differently: the test can fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from _train_tiny import save_tiny, write_classification
from safetensors.torch import load_file

from deltatune.train import loop, resume
from deltatune.train.options import TrainOptions

STEPS = 16


class Stop(Exception):
    """Stands in for a kill: the process state is lost, only the checkpoints on disk remain."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adalora_resume")
    return {"bert": save_tiny("bert", root / "bert", dropout=0.1), "cls": write_classification(root / "cls.jsonl", 80)}


def _options(assets: dict[str, Path], out: Path, **kw: Any) -> TrainOptions:
    # budget 4 -> 2 triplets per layer: pruning every 2 steps over steps 3..12, final mask from step 13 on
    adalora = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "target_modules": ["query", "value"],
               "lora_dropout": 0.1}
    return TrainOptions(model=str(assets["bert"]), data=str(assets["cls"]), output_dir=str(out), quiet=True,
                        threads=1, batch_size=8, max_steps=STEPS, lr=2e-2, method="adalora", method_options=adalora,
                        save_every=2, **kw)


def _stop_before(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``train_step`` raise when asked for optimizer step ``step`` (1-based)."""
    real, calls = loop.train_step, {"n": 0}

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            raise Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", counting)


def _result(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[bool]]]:
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), config["rank_pattern"]


@pytest.mark.parametrize("stop_at", [8, 15], ids=["while-pruning", "final-mask-phase"])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(assets: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, stop_at: int) -> None:
    loop.train(_options(assets, tmp_path / "reference"))
    expected, expected_masks = _result(tmp_path / "reference")
    assert 0 < sum(map(sum, expected_masks.values())) < 4 * len(expected_masks)  # pruning happened

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _stop_before(stop_at, patch)
        with pytest.raises(Stop):
            loop.train(_options(assets, out))
    saved = resume.list_checkpoints(out)[-1]
    assert saved.name == f"step-{stop_at - 2 + stop_at % 2:06d}" and (saved / resume.HOOKS_FILE).exists()
    control = tmp_path / "control"
    shutil.copytree(out, control)

    loop.train(_options(assets, out, resume=True))
    got, got_masks = _result(out)
    assert got_masks == expected_masks
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=1e-6, rtol=0, msg=key)

    with monkeypatch.context() as patch:  # the state dropped on resume: the old behaviour
        patch.setattr(resume, "load_step_hook_state", lambda model, state: None)
        loop.train(_options(assets, control, resume=True))
    lost, lost_masks = _result(control)
    assert lost_masks != expected_masks or any(
        lost[k].shape != t.shape or not torch.allclose(lost[k], t, atol=1e-6, rtol=0) for k, t in expected.items())


def test_state_for_another_adapter_is_refused_before_anything_changes(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    import deltatune as dt
    from deltatune.errors import CheckpointError
    from deltatune.step_hooks import load_step_hook_state, step_hook_state, step_hooks

    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=20))
    model = dt.get_delta_model(base, dt.AdaLoraConfig(init_r=3, target_r=1, tinit=0, tfinal=0, total_step=4,
                                                      target_modules=["query"]))
    (hook,) = step_hooks(model)
    model(input_ids=torch.randint(0, 50, (2, 5))).last_hidden_state.sum().backward()
    hook.after_optimizer_step(1)
    state = step_hook_state(model)
    assert {k.split("/")[0] for k in state} == {"default"} and any(k.startswith("default/ipt.") for k in state)
    before = {k: v.clone() for k, v in hook.state_dict().items()}
    with pytest.raises(CheckpointError, match="other"):
        load_step_hook_state(model, {"other/ipt.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_step_hook_state(model, {k: torch.zeros(7) for k in state})
    after = hook.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
