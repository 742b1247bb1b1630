"""Token usage: what providers report, and estimates when they do not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    #: False while only an estimate is known.
    reported: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object; cached prompt tokens (Anthropic's cache reads, Gemini's
        cached content) as ``prompt_tokens_details.cached_tokens``, where OpenAI puts its own."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out

    def take_openai(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                self.cached_tokens = int(details.get("cached_tokens") or 0)
            self.reported = True

    def take_anthropic(self, usage: Any) -> None:
        if isinstance(usage, dict):
            if "input_tokens" in usage:
                self.prompt_tokens = int(usage.get("input_tokens") or 0) + int(
                    usage.get("cache_read_input_tokens") or 0
                ) + int(usage.get("cache_creation_input_tokens") or 0)
                self.cached_tokens = int(usage.get("cache_read_input_tokens") or 0)
            if "output_tokens" in usage:
                self.completion_tokens = int(usage.get("output_tokens") or 0)
            self.reported = True


def estimate_tokens(text: str) -> int:
    """About four characters a token for English; good enough to reserve limits."""
    return max(1, (len(text) + 3) // 4) if text else 0


def text_of(content: Any) -> str:
    """Concatenate the text in an OpenAI or Anthropic content value."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    parts.append(t)
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def _chars(n: int) -> int:
    """``estimate_tokens`` of a text of ``n`` characters."""
    return max(1, (n + 3) // 4) if n else 0


def _text_len(content: Any) -> int:
    """``len(text_of(content))`` without building the text: this runs on every request."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    total = parts = 0
    for part in content:
        t = part.get("text") if isinstance(part, dict) else part
        if isinstance(t, str):
            total += len(t)
            parts += 1
    return total + parts - 1 if parts else 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Estimate the input tokens of a chat, messages, completions or embeddings body."""
    n = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                n += 4 + _chars(_text_len(m.get("content")))
    system = body.get("system")
    if system is not None:
        n += _chars(_text_len(system))
    for key in ("prompt", "input"):
        v = body.get(key)
        if isinstance(v, str):
            n += estimate_tokens(v)
        elif isinstance(v, list):
            n += sum(estimate_tokens(x) for x in v if isinstance(x, str))
    return n
