"""Requests and responses of the OpenAI wire format that ``deltatune serve`` speaks.

Requests are pydantic models (validated field by field; a bad value is a 400 that names the field).
Responses are plain dicts built by the functions below, shaped like OpenAI's: ``text_completion`` /
``chat.completion`` objects, their ``*.chunk`` streaming forms and ``usage`` token counts. Fields
OpenAI defines but this server does not implement are refused when set, never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Fields OpenAI defines that this server does not implement; a request that sets them to a
#: non-default value gets a 400 naming the field.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"})}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What every generation request shares (OpenAI's names, ranges and defaults)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported_field(self) -> str | None:
        """The first field set to a value this server cannot honour, if any."""
        for name, defaults in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name, None) not in defaults:
                return name
        return None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: continue ``prompt`` (a string, or a list of strings: one answer set each)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``: answer ``messages`` formatted with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, texts: list[str], reasons: list[str], use: dict[str, int],
                        chat: bool) -> dict[str, Any]:
    """A whole (non-streamed) ``text_completion`` or ``chat.completion`` object."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}


def chunk(rid: str, model: str, index: int, text: str | None, reason: str | None, chat: bool,
          role: bool = False) -> dict[str, Any]:
    """One streamed piece of choice ``index``: new ``text`` and/or its ``finish_reason``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, use: dict[str, int], chat: bool) -> dict[str, Any]:
    """The last streamed chunk: no choices, the request's token counts."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": use}


def model_list(names: list[str], base: str) -> dict[str, Any]:
    created = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "deltatune",
                                        "root": base, "parent": None if n == base else base} for n in names]}
