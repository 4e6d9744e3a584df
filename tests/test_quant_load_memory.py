"""A quantized base keeps no view of the float checkpoint file (``quant.convert.copy_float_tensors_off_the_file``).

transformers memory-maps safetensors; a float tensor left viewing the mapping (the embedding, the norms of
a quantized model) keeps every page of the float file read while loading resident. The check here is
independent of the code under test: ``/proc/self/maps`` says which address ranges map the file, and no
parameter or buffer of the loaded model may lie in one (Linux only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from deltatune.quant.load import from_pretrained_quantized

pytestmark = [pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")]


def file_ranges(name: str) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(name):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def tensors_in(model: nn.Module, ranges: list[tuple[int, int]]) -> list[str]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]


@pytest.mark.parametrize("kind", ["nf4", "torchao-int8"])
def test_quantized_load_leaves_no_tensor_on_the_file_mapping(tmp_path: Path, kind: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_quant_embedding import tied_llama
    from transformers import LlamaForCausalLM

    source = tied_llama()
    source.save_pretrained(tmp_path / "m")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ranges = file_ranges("model.safetensors")
    assert ranges and "model.embed_tokens.weight" in tensors_in(plain, ranges)  # the check sees a mapped tensor
    del plain

    model = from_pretrained_quantized(LlamaForCausalLM, str(tmp_path / "m"), kind)
    assert tensors_in(model, file_ranges("model.safetensors")) == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives the copy
    assert torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, source.model.norm.weight)
