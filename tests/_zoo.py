"""Tiny random-init models of many transformers families, built offline from their default configs.

Each family is named by its ``model_type`` and the model class the zoo builds; sizes are shrunk to
hidden 32, 2 layers, 4 heads (2 key/value heads where the family has grouped-query attention),
vocab 100, 4 experts for mixture-of-experts models. Nothing reaches a model hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

VOCAB = 100
#: config fields shrunk wherever a family's config has them (aliases map to its own names)
TINY: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 40, "max_position_embeddings": 64, "head_dim": 8, "d_model": 32, "d_ff": 40, "d_kv": 8, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 40, "decoder_ffn_dim": 40, "n_embd": 32, "n_layer": 2, "n_head": 4,
    "n_positions": 64, "num_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "embedding_size": 32, "dim": 32, "hidden_dim": 40, "n_layers": 2, "n_heads": 4,
    "emb_dim": 32, "ffn_dim": 40, "decoder_start_token_id": 0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


@dataclass(frozen=True)
class Family:
    """One family of the zoo: ``kind`` is ``decoder``, ``encoder``, ``encoder-decoder`` (``moe`` marks MoE)."""

    model_type: str
    model_class: str
    kind: str
    moe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        return self.kind in ("decoder", "encoder-decoder")

    @property
    def task_type(self) -> str | None:
        return {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM"}.get(self.kind)


def _f(model_type: str, model_class: str, kind: str, moe: bool = False, **extra: Any) -> Family:
    return Family(model_type, model_class, kind, moe, extra)


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    # decoders
    _f("llama", "LlamaForCausalLM", "decoder"), _f("mistral", "MistralForCausalLM", "decoder"),
    _f("qwen2", "Qwen2ForCausalLM", "decoder"), _f("qwen3", "Qwen3ForCausalLM", "decoder"),
    _f("gemma", "GemmaForCausalLM", "decoder"), _f("gemma2", "Gemma2ForCausalLM", "decoder"),
    _f("gemma3_text", "Gemma3ForCausalLM", "decoder"), _f("phi", "PhiForCausalLM", "decoder"),
    _f("phi3", "Phi3ForCausalLM", "decoder"), _f("stablelm", "StableLmForCausalLM", "decoder"),
    _f("starcoder2", "Starcoder2ForCausalLM", "decoder"), _f("gpt2", "GPT2LMHeadModel", "decoder"),
    _f("gpt_bigcode", "GPTBigCodeForCausalLM", "decoder"), _f("gpt_neo", "GPTNeoForCausalLM", "decoder"),
    _f("gpt_neox", "GPTNeoXForCausalLM", "decoder"), _f("gptj", "GPTJForCausalLM", "decoder", rotary_dim=4),
    _f("codegen", "CodeGenForCausalLM", "decoder", rotary_dim=4), _f("bloom", "BloomForCausalLM", "decoder"),
    _f("falcon", "FalconForCausalLM", "decoder", ffn_hidden_size=40),
    _f("mpt", "MptForCausalLM", "decoder"), _f("opt", "OPTForCausalLM", "decoder", word_embed_proj_dim=32, ffn_dim=40),
    _f("biogpt", "BioGptForCausalLM", "decoder"), _f("xglm", "XGLMForCausalLM", "decoder"),
    _f("cohere", "CohereForCausalLM", "decoder"), _f("olmo", "OlmoForCausalLM", "decoder"),
    _f("olmo2", "Olmo2ForCausalLM", "decoder"), _f("granite", "GraniteForCausalLM", "decoder"),
    _f("nemotron", "NemotronForCausalLM", "decoder"), _f("persimmon", "PersimmonForCausalLM", "decoder"),
    _f("openai-gpt", "OpenAIGPTLMHeadModel", "decoder"), _f("helium", "HeliumForCausalLM", "decoder"),
    _f("smollm3", "SmolLM3ForCausalLM", "decoder"), _f("ctrl", "CTRLLMHeadModel", "decoder", dff=40),
    # mixture of experts (decoders)
    _f("mixtral", "MixtralForCausalLM", "decoder", moe=True), _f("qwen2_moe", "Qwen2MoeForCausalLM", "decoder", moe=True),
    _f("qwen3_moe", "Qwen3MoeForCausalLM", "decoder", moe=True), _f("olmoe", "OlmoeForCausalLM", "decoder", moe=True),
    _f("granitemoe", "GraniteMoeForCausalLM", "decoder", moe=True), _f("phimoe", "PhimoeForCausalLM", "decoder", moe=True),
    _f("gpt_oss", "GptOssForCausalLM", "decoder", moe=True), _f("llama4_text", "Llama4ForCausalLM", "decoder", moe=True),
    # encoders
    _f("bert", "BertForMaskedLM", "encoder"), _f("roberta", "RobertaForMaskedLM", "encoder"),
    _f("distilbert", "DistilBertForMaskedLM", "encoder"), _f("albert", "AlbertForMaskedLM", "encoder"),
    _f("electra", "ElectraForMaskedLM", "encoder"), _f("deberta", "DebertaForMaskedLM", "encoder"),
    _f("deberta-v2", "DebertaV2ForMaskedLM", "encoder"), _f("mpnet", "MPNetForMaskedLM", "encoder"),
    _f("xlm-roberta", "XLMRobertaForMaskedLM", "encoder"), _f("camembert", "CamembertForMaskedLM", "encoder"),
    _f("ernie", "ErnieForMaskedLM", "encoder"), _f("roformer", "RoFormerForMaskedLM", "encoder"),
    _f("megatron-bert", "MegatronBertForMaskedLM", "encoder"), _f("data2vec-text", "Data2VecTextForMaskedLM", "encoder"),
    _f("flaubert", "FlaubertWithLMHeadModel", "encoder"), _f("nomic_bert", "NomicBertForMaskedLM", "encoder"),
    # encoder-decoders
    _f("t5", "T5ForConditionalGeneration", "encoder-decoder"), _f("mt5", "MT5ForConditionalGeneration", "encoder-decoder"),
    _f("umt5", "UMT5ForConditionalGeneration", "encoder-decoder"),
    _f("longt5", "LongT5ForConditionalGeneration", "encoder-decoder"),
    _f("bart", "BartForConditionalGeneration", "encoder-decoder"), _f("mbart", "MBartForConditionalGeneration", "encoder-decoder"),
    _f("pegasus", "PegasusForConditionalGeneration", "encoder-decoder"),
    _f("blenderbot", "BlenderbotForConditionalGeneration", "encoder-decoder"),
    _f("marian", "MarianMTModel", "encoder-decoder", decoder_vocab_size=VOCAB),
    _f("m2m_100", "M2M100ForConditionalGeneration", "encoder-decoder"),
    _f("plbart", "PLBartForConditionalGeneration", "encoder-decoder"),
    _f("switch_transformers", "SwitchTransformersForConditionalGeneration", "encoder-decoder", moe=True),
]}


def tiny_config(family: Family) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.for_model(family.model_type)
    for key, value in {**TINY, **family.extra}.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError, TypeError):
                pass
    if family.kind == "encoder-decoder":
        config.decoder_start_token_id = 0
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # tied heads have their own test (test_tied_embeddings.py)
    return config


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random-init model of family ``name`` with weights fixed by ``seed``, in eval mode, fp32."""
    import transformers

    family = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(tiny_config(family))
    return model.eval()


def tiny_inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 123) -> dict[str, torch.Tensor]:
    """Keyword inputs for family ``name`` (token ids avoid the special ids 0-2)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if FAMILIES[name].kind == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=gen)
    return inputs
