"""Legacy OpenAI completions -> chat completions.

Theory of operation: one registered translation, ``COMPLETIONS -> CHAT``, so a
provider that only takes chat (or, composed with chat -> messages, only
Anthropic messages) still answers ``/v1/completions``. A prompt is one user
message; the reply's message text is the completion's ``text``; stream chunks
become ``text_completion`` chunks, and a usage-only chunk passes through as
one when the client asked for it (the chat request carries its
``stream_options``, so the chat side emits it only then).

Completions features chat cannot express are refused with a 400 (several
prompts, token-id prompts, ``echo``, ``suffix``, ``logprobs``, ``best_of``
above 1, any field not listed here) rather than answered differently.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .._errors import InvalidField, UpstreamUnavailable
from .._sse import SSEEvent
from .._translate_fields import refuse_unknown
from .._usage import Usage
from ..providers import Operation
from ._translate import StreamTranslator, Translation, register

#: Request keys that mean the same in both operations.
_SHARED = (
    "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "user", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias",
)


#: Everything ``completions_to_chat_request`` knows: the shared keys, and the prompt-only
#: ones it checks below.
_FIELDS = frozenset({"model", "prompt", "echo", "suffix", "logprobs", *_SHARED})
_NEUTRAL = {"best_of": lambda v: v == 1}


def completions_to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    refuse_unknown(body, _FIELDS, _NEUTRAL, "a chat-only provider")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidField("'prompt' must be one string for this model", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidField("'prompt' must be a string", param="prompt")
    if body.get("echo"):
        raise InvalidField("'echo' is not supported by this model", param="echo")
    if body.get("suffix"):
        raise InvalidField("'suffix' is not supported by this model", param="suffix")
    if body.get("logprobs") is not None:
        raise InvalidField("'logprobs' is not supported by this model", param="logprobs")
    out: dict[str, Any] = {"model": body.get("model"), "messages": [{"role": "user", "content": prompt}]}
    for key in _SHARED:
        if body.get(key) is not None:
            out[key] = body[key]
    return out


def chat_to_completions_response(body: dict[str, Any], usage: Usage, *, created: int) -> dict[str, Any]:
    choices = []
    for c in body.get("choices") or []:
        msg = c.get("message") or {}
        choices.append({"index": c.get("index", 0), "text": msg.get("content") or "", "logprobs": None,
                        "finish_reason": c.get("finish_reason")})
    return {
        "id": body.get("id"),
        "object": "text_completion",
        "created": body.get("created") or created,
        "model": body.get("model"),
        "choices": choices,
        "usage": usage.openai(),
    }


class CompletionsFromChatStream(StreamTranslator):
    def __init__(self, model: str, *, created: int) -> None:
        self.model = model
        self.created = created
        self.finished = False

    def feed(self, event: SSEEvent) -> list[SSEEvent]:
        chunk = event.json()
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk and "choices" not in chunk:
            return [event]  # an OpenAI-shaped error means the same to a completions client
        base = {"id": chunk.get("id"), "object": "text_completion",
                "created": chunk.get("created") or self.created, "model": chunk.get("model") or self.model}
        choices = []
        for c in chunk.get("choices") or []:
            text = (c.get("delta") or {}).get("content") or ""
            finish = c.get("finish_reason")
            if finish:
                self.finished = True
            if text or finish:
                choices.append({"index": c.get("index", 0), "text": text, "logprobs": None,
                                "finish_reason": finish})
        if choices:
            return [SSEEvent(data=orjson.dumps({**base, "choices": choices}))]
        if isinstance(chunk.get("usage"), dict):
            return [SSEEvent(data=orjson.dumps({**base, "choices": [], "usage": chunk["usage"]}))]
        return []  # the role-only opening chunk has nothing to say here

    def finish(self, usage: Usage) -> list[SSEEvent]:
        if not self.finished:
            raise UpstreamUnavailable("upstream stream ended without a finish_reason")
        return []


register(Translation(
    source=Operation.COMPLETIONS,
    target=Operation.CHAT,
    request=completions_to_chat_request,
    response=lambda body, usage: chat_to_completions_response(body, usage, created=int(time.time())),
    stream=lambda model, body: CompletionsFromChatStream(model, created=int(time.time())),
))
