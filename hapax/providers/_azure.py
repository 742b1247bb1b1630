"""Azure OpenAI: OpenAI's wire format behind per-deployment URLs and an ``api-key`` header.

Bodies, streams and error bodies are OpenAI's, so everything but the address
and the credential is inherited from ``OpenAIProvider``. The deployment
(``models[].deployments[].model`` in the config) names the Azure deployment;
Azure ignores the body's ``model`` field, so it is sent unchanged.
"""

from __future__ import annotations

from typing import ClassVar
from urllib.parse import quote, urlencode

import orjson

from ._base import Operation
from ._openai import _PATHS, OpenAIProvider

#: The newest GA (non-preview) data-plane inference version with deployment URLs.
#: It is the first GA one that honours ``stream_options.include_usage``, which the
#: OpenAI adapter relies on to count streamed tokens.
DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    type = "azure-openai"
    operations: ClassVar[frozenset[Operation]] = frozenset(_PATHS)
    base_url_hint = "an azure-openai provider's base_url is https://RESOURCE.openai.azure.com, without a path"

    def route_missing(self, raw: bytes) -> bool:
        # Azure's front answers a path it does not serve with a JSON error of its own, code
        # "404"; a missing deployment is "DeploymentNotFound", the model's problem.
        try:
            err = orjson.loads(raw).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            return True
        if isinstance(err, dict) and err.get("code") == "404":
            return True
        return super().route_missing(raw)

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
