"""Write a LoRA adapter as a GGUF LoRA file, the format llama.cpp loads with ``--lora FILE.gguf``.

LoRA (arXiv 2106.09685) adds ``s * B A x`` to a linear layer ``W x`` with ``A`` (r, in), ``B`` (out, r) and
``s = lora_alpha / r``. llama.cpp computes the same sum with ``s = adapter.lora.alpha / r`` (times the
user's ``--lora-scaled`` factor), reading ``r`` from each tensor's shape. The file holds:

* metadata ``general.architecture`` (the base's llama.cpp architecture), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` and ``general.base_model.*`` when a base is recorded;
* per wrapped linear layer, two tensors named after the base weight in llama.cpp's naming, found with
  the ``gguf`` package's tensor-name map: ``blk.N.attn_q.weight.lora_a`` = ``A`` (r, in) and
  ``...lora_b`` = ``B`` (out, r), stored in torch's row-major layout (GGUF lists dimensions the other
  way round: ``ne = [in, r]`` and ``[r, out]``, the shapes llama.cpp checks against the base weight).

llama.cpp stores a Llama model's query and key weights with their rows permuted for its rotary
embedding (``permute`` below, the reordering llama.cpp's HF converter applies). ``B A`` must be permuted
the same way, which reordering ``B``'s rows does.

Refused, each with an error saying why: DoRA (llama.cpp has no magnitude vector), per-module rank or
alpha patterns, trained biases or full modules (``modules_to_save``), LoRA on embeddings, methods other
than LoRA, and architectures other than Llama's (use llama.cpp's ``convert_lora_to_gguf.py`` there).
rsLoRA (``s = alpha / sqrt(r)``) is written as ``adapter.lora.alpha = alpha * sqrt(r)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..bundled import resolve_model_path
from ..checkpoint.atomic import atomic_write
from ..checkpoint.io import KEY_PREFIX, load_tensors
from ..config import CONFIG_NAME, read_config_file
from ..errors import CheckpointError, ConfigError

#: transformers ``model_type`` -> llama.cpp architecture name, for bases whose tensors map one to one.
ARCHITECTURES = {"llama": "llama"}
#: projections llama.cpp stores row-permuted for rotary embeddings, and the config field with their head count.
PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of ``weight`` (out, ...) reordered per head from HF's rotary layout (halves) to llama.cpp's
    (interleaved pairs): within each head, row ``i`` of the first half and row ``i`` of the second half
    become rows ``2i`` and ``2i + 1``."""
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def adapter_folder(path: Path) -> Path:
    """The adapter folder itself, or ``adapter/`` of a ``deltatune train`` run folder."""
    for folder in (path, path / "adapter"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise CheckpointError(f"{path} holds no {CONFIG_NAME}: pass an adapter folder (save_pretrained's output, a "
                          "Trainer checkpoint-N folder) or a run folder from 'deltatune train'.")


def check_expressible(config: dict[str, Any], folder: Path) -> None:
    """Refuse what a GGUF LoRA cannot hold, before anything is written."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter; llama.cpp loads LoRA adapters only")
    if config.get("use_dora"):
        problems.append("it uses DoRA, whose magnitude vector llama.cpp cannot apply; train plain LoRA or merge it "
                        "('deltatune merge') and convert the merged model")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("it sets rank_pattern/alpha_pattern; a GGUF LoRA has one alpha for all layers")
    if config.get("bias", "none") != "none":
        problems.append(f"it trains biases (bias={config.get('bias')!r}), which a GGUF LoRA cannot hold")
    if config.get("modules_to_save"):
        problems.append(f"it trains whole modules ({config['modules_to_save']}), which a GGUF LoRA cannot hold")
    if problems:
        raise ConfigError(f"Cannot export {folder} to GGUF: {'; '.join(problems)}.")


def base_config(config: dict[str, Any], folder: Path, model: str | None) -> dict[str, Any]:
    """The base model's ``config.json`` (only the config is read): ``model`` if given, else the recorded base."""
    recorded = config.get("base_model_name_or_path")
    name = model or recorded
    if not name:
        raise ConfigError(f"The adapter in {folder} records no base model; pass --model (a local folder or a "
                          "bundled name such as smollm2; only its config.json is read).")
    try:
        path = Path(resolve_model_path(name))
    except FileNotFoundError as exc:
        raise ConfigError(f"The adapter in {folder} was trained on {name!r}, which is not a local folder or bundled "
                          "model here (deltatune never downloads); pass --model with the base model's folder.") from exc
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; pass --model with the base model's transformers folder.")
    return json.loads((path / "config.json").read_text(encoding="utf-8")) | {"_name_or_path": name}


def lora_pairs(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module path: (A, B)}`` from peft's keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B``."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        body = key.removeprefix(KEY_PREFIX)
        for part in ("A", "B"):
            if body.endswith(f".lora_{part}.weight"):
                pairs.setdefault(body[: -len(f".lora_{part}.weight")], {})[part] = value
                break
        else:
            what = "LoRA on an embedding" if "lora_embedding" in key else "a tensor that is not a LoRA A/B matrix"
            raise ConfigError(f"Cannot export {folder} to GGUF: {key} is {what}, which a GGUF LoRA cannot hold.")
    incomplete = [path for path, ab in pairs.items() if len(ab) != 2]
    if incomplete:
        raise CheckpointError(f"{folder}: {incomplete[:3]} lack lora_A or lora_B; the adapter file is incomplete.")
    return {path: (ab["A"], ab["B"]) for path, ab in pairs.items()}


def gguf_tensors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], hparams: dict[str, Any],
                 folder: Path) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name -> float32 tensor (``.lora_a`` = A, ``.lora_b`` = B, q/k rows permuted)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHITECTURES[hparams["model_type"]])
    name_map = gguf.get_tensor_name_map(arch, hparams["num_hidden_layers"])
    out: dict[str, torch.Tensor] = {}
    for path, (a, b) in sorted(pairs.items()):
        name = name_map.get_name(path + ".weight", try_suffixes=(".weight",))
        if name is None or (name == "output.weight" and hparams.get("tie_word_embeddings")):
            raise ConfigError(f"Cannot export {folder} to GGUF: llama.cpp has no separate tensor for {path} "
                              "(tied or unknown); retrain without targeting it.")
        leaf = path.rsplit(".", 1)[-1]
        if leaf in PERMUTED:
            b = permute(b, int(hparams.get(PERMUTED[leaf]) or hparams["num_attention_heads"]))
        out[f"{name}.lora_a"] = a.float().contiguous()  # (r, in): GGUF ne = [in, r]
        out[f"{name}.lora_b"] = b.float().contiguous()  # (out, r): GGUF ne = [r, out]
    return out


def export_gguf_lora(adapter: str | Path, out: str | Path, model: str | None = None) -> Path:
    """Write the LoRA adapter in ``adapter`` as a GGUF LoRA file at ``out``; returns ``out``.

    ``model`` names the base (local folder or bundled name) when the adapter does not record one that
    exists here; only its ``config.json`` is read. The file is written to a temporary name and renamed,
    so a refused or failed export leaves nothing at ``out``.
    """
    import gguf

    folder = adapter_folder(Path(adapter))
    config = read_config_file(folder)
    check_expressible(config, folder)
    hparams = base_config(config, folder, model)
    if hparams.get("model_type") not in ARCHITECTURES:
        raise ConfigError(f"Cannot export {folder} to GGUF: base architecture {hparams.get('model_type')!r} is not "
                          f"supported here (only {sorted(ARCHITECTURES)}); use llama.cpp's convert_lora_to_gguf.py "
                          "with --base for other architectures.")
    tensors = gguf_tensors(lora_pairs(load_tensors(folder), folder), hparams, folder)
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
        alpha *= math.sqrt(int(config["r"]))
    base_name = str(hparams["_name_or_path"])

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURES[hparams["model_type"]])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{Path(base_name).name} LoRA")
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out = Path(out)
    atomic_write(out, write)
    return out
