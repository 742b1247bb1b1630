"""Provider adapters, by config ``type``."""

from __future__ import annotations

from .._transport import Transport
from ..config import ProviderConfig
from ._anthropic import AnthropicProvider
from ._azure import AzureOpenAIProvider
from ._base import (
    PROVIDER_HEADERS,
    Call,
    EventBatches,
    JsonReply,
    Operation,
    Provider,
    Reply,
    StreamReply,
    has_provider_headers,
)
from ._gemini import GeminiProvider
from ._mock import MockProvider
from ._openai import OpenAIProvider

__all__ = [
    "PROVIDER_HEADERS",
    "PROVIDER_TYPES",
    "AnthropicProvider",
    "AzureOpenAIProvider",
    "Call",
    "EventBatches",
    "GeminiProvider",
    "JsonReply",
    "MockProvider",
    "OpenAIProvider",
    "Operation",
    "Provider",
    "Reply",
    "StreamReply",
    "build_provider",
    "has_provider_headers",
]

PROVIDER_TYPES: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "mock": MockProvider,
    "azure-openai": AzureOpenAIProvider,
    "gemini": GeminiProvider,
}


def build_provider(name: str, config: ProviderConfig, transport: Transport) -> Provider:
    try:
        cls = PROVIDER_TYPES[config.type]
    except KeyError:
        raise RuntimeError(f"provider type {config.type!r} has no adapter") from None
    return cls(name=name, config=config, transport=transport)
