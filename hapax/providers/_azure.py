"""Azure OpenAI: OpenAI's wire format behind per-deployment URLs and an ``api-key`` header.

Bodies, streams and error bodies are OpenAI's, so everything but the address
and the credential is inherited from ``OpenAIProvider``. The deployment
(``models[].deployments[].model`` in the config) names the Azure deployment;
Azure ignores the body's ``model`` field, so it is sent unchanged.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote, urlencode

from ._base import Operation
from ._openai import _PATHS, OpenAIProvider

#: The newest GA (non-preview) data-plane inference version with deployment URLs.
#: It is the first GA one that honours ``stream_options.include_usage``, which the
#: OpenAI adapter relies on to count streamed tokens.
DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    type = "azure-openai"
    operations: ClassVar[frozenset[Operation]] = frozenset(_PATHS)

    def url(self, op: Operation, model: str) -> str:
        # The config validator makes base_url mandatory for this type.
        base = (self.config.base_url or "").rstrip("/")
        query = urlencode({"api-version": self.config.api_version or DEFAULT_API_VERSION})
        return f"{base}/openai/deployments/{quote(model, safe='')}{_PATHS[op]}?{query}"

    def headers(self) -> dict[str, str]:
        h = {"content-type": "application/json", "accept": "application/json"}
        if self.config.api_key is not None:
            h["api-key"] = self.config.api_key.get_secret_value()
        # Applied last so a configured ``authorization: Bearer <Entra ID token>`` also works.
        h.update(self.config.headers)
        return h
