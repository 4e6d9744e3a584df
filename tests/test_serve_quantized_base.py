"""``deltatune serve``'s one base, chosen from the command-line adapters (:mod:`deltatune.serve.base_choice`).

Three runs on a tiny Llama (widths multiples of 64 for bitsandbytes' CPU kernels), one step each: a plain nf4
QLoRA run, a LoftQ run with ``loftq_iter=2`` (its own base ``Q_2`` saved beside the adapter), and a float run.
The reference for the LoftQ server is ``deltatune eval``'s loader (:func:`load_for_inference`), and the saved
fingerprint of the LoftQ adapter hashes ``Q_2``'s codes, so its load passes only on that base.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _train_tiny import VOCAB, save_quantizable_llama, write_pairs

from deltatune.cli import build_parser, main

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("bitsandbytes")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_qbase")
    model, pairs = save_quantizable_llama(root / "llama"), write_pairs(root / "pairs.jsonl", 16)
    common = ["train", "--model", str(model), "--data", str(pairs), "--max-steps", "1", "--quiet", "--threads", "1",
              "--batch-size", "8", "--max-eval-examples", "4", "--method-opt", "r=4", "--method-opt", "lora_alpha=8",
              "--lr", "1e-2"]
    assert main([*common, "--quantize", "nf4", "--output-dir", str(root / "nf4")]) == 0
    assert main([*common, "--quantize", "nf4", "--method-opt", "init_lora_weights=loftq",
                 "--method-opt", "loftq_config={loftq_iter: 2}", "--output-dir", str(root / "loftq")]) == 0
    assert main([*common, "--output-dir", str(root / "float")]) == 0
    return {"model": model, "nf4": root / "nf4", "loftq": root / "loftq", "float": root / "float"}


def server_for(runs: dict[str, Path], *adapters: str, extra: tuple[str, ...] = ()) -> object:
    from deltatune.serve.server import build_server

    flags = [arg for name in adapters for arg in ("--adapter", f"{name}={runs[name]}")]
    return build_server(build_parser().parse_args(["serve", "--model", str(runs["model"]), *flags, *extra]))


def test_the_base_is_quantized_as_the_adapters_were_trained(runs: dict) -> None:
    from deltatune.quant import quantization

    server = server_for(runs, "nf4")  # no --quantize: the adapter's fingerprint says nf4
    layer = server.registry.model.get_base_model().model.layers[0].mlp.down_proj
    assert quantization(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer) == "nf4"
    assert server.registry.base_from is None


def test_a_loftq_adapter_brings_its_base_and_computes_what_eval_computes(runs: dict) -> None:
    from deltatune.commands.inference import load_for_inference
    from deltatune.serve.mixed_forward import prefill_rows

    server = server_for(runs, "loftq")  # its fingerprint check passes only on Q_2's codes
    assert server.registry.base_from == "loftq"
    reference = load_for_inference(str(runs["loftq"])).model
    ids = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = server.registry.model.eval()  # as the server runs it (and reference: load_for_inference's eval mode)
    with torch.no_grad():
        logits, _, _ = prefill_rows(model, ["loftq"], inputs)
        want = reference(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_adapters_on_another_base_are_refused_with_the_reason(runs: dict) -> None:
    from deltatune.errors import ConfigError
    from deltatune.serve.errors import ApiError

    server = server_for(runs, "loftq")
    with pytest.raises(ApiError, match="base carries adapter 'loftq'.s LoftQ base layers"):
        server.registry.load("plain", runs["nf4"])  # as POST /v1/adapters would
    assert server.registry.names == ["loftq"]  # the served adapter is untouched

    server = server_for(runs, "nf4")
    with pytest.raises(ApiError, match="carries its own LoftQ base layers"):
        server.registry.load("late", runs["loftq"])
    assert server.registry.names == ["nf4"]

    with pytest.raises(ConfigError, match=r"differently quantized bases \(nf4: nf4, float: float\)"):
        server_for(runs, "nf4", "float")
    with pytest.raises(ConfigError, match="base carries adapter 'loftq'.s LoftQ base layers"):
        server_for(runs, "nf4", "loftq")  # the LoftQ base is the server's, whatever the order; nf4 cannot share it
