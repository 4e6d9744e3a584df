"""Choosing the next token from one sequence's logits: greedy, or temperature + nucleus (top-p) sampling.

Greedy (``temperature == 0``) is ``argmax(logits)``, the token ``model.generate(do_sample=False)`` picks.
Sampling draws from ``softmax(logits / T)`` restricted to the smallest set of most likely tokens whose
probabilities sum to at least ``top_p`` (Holtzman et al., "The Curious Case of Neural Text
Degeneration", arXiv 1904.09751). Each sequence owns a ``torch.Generator``, so a request's ``seed``
makes its answer repeatable whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request decodes; ``stop`` strings end a choice and are left out of its text."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-6


def make_generator(params: SamplingParams, choice: int) -> torch.Generator | None:
    """The random stream of one choice: ``seed + choice`` when seeded (choices differ, reruns agree)."""
    if params.greedy:
        return None
    gen = torch.Generator()
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed + choice)
    return gen


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from ``logits`` ``(V,)`` of one sequence."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # (V,), (V,)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= params.top_p] = 0.0  # the top token always stays (before == 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
