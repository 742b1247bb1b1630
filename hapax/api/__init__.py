"""The API surface: request validation and translation between the OpenAI and Anthropic formats."""

from __future__ import annotations

from ._error_shape import error_body, error_response, stream_error
from ._model_name import rename
from ._translate import StreamTranslator, Translation, find_translation
from ._validate import read_json_body, validate

__all__ = [
    "StreamTranslator",
    "Translation",
    "error_body",
    "error_response",
    "find_translation",
    "read_json_body",
    "rename",
    "stream_error",
    "validate",
]
