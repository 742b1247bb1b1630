"""Front-door behaviour every client sees: errors, request ids, limits, CORS, panics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.gateway_process import GatewayProcess

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}


def _config(**server: object) -> dict[str, object]:
    return {
        "server": {"max_body_bytes": 2048, **server},
        "providers": {
            "demo": {"type": "mock"},
            "buggy": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_mode": "exception"}},
            "down": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": 503}},
        },
        "models": [
            {"name": "demo", "provider": "demo"},
            {"name": "buggy", "provider": "buggy"},
            {"name": "down", "provider": "down"},
        ],
    }


@pytest.fixture
def gw(gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return gateway(_config())


def _post(gw: GatewayProcess, body: bytes | None = None, **kw: object) -> httpx.Response:
    headers = {"content-type": "application/json", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(gw.url + "/v1/chat/completions", content=body, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def _error(r: httpx.Response) -> dict[str, object]:
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code", "request_id"}
    assert err["request_id"] == r.headers["x-request-id"]
    return err  # type: ignore[no-any-return]


def test_malformed_json_is_400(gw: GatewayProcess) -> None:
    r = _post(gw, b'{"model": "demo", "messages": [')
    assert r.status_code == 400
    assert _error(r)["code"] == "invalid_json"


def test_missing_field_names_the_param(gw: GatewayProcess) -> None:
    r = _post(gw, b'{"model": "demo"}')
    assert r.status_code == 400
    err = _error(r)
    assert err["param"] == "messages" and err["code"] == "missing_required_parameter"


def test_wrong_type_names_the_param(gw: GatewayProcess) -> None:
    r = _post(gw, b'{"model": "demo", "messages": [{"role": "user"}], "stream": "yes"}')
    assert r.status_code == 400 and _error(r)["param"] == "stream"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": 1}]}, "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stop_sequences": "x"},
     "stop_sequences"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
])
def test_malformed_fields_are_400_before_any_upstream_call(
    gw: GatewayProcess, path: str, body: dict[str, object], param: str
) -> None:
    r = httpx.post(gw.url + path, json={"model": "demo", **body}, timeout=10)
    assert r.status_code == 400
    err = r.json()["error"]
    if path == "/v1/messages":  # Anthropic's error body has no param: the message names it
        assert err["type"] == "invalid_request_error" and param in err["message"]
    else:
        assert err["param"] == param


def test_body_too_large_is_413(gw: GatewayProcess) -> None:
    big = b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"x" * 4096 + b'"}]}'
    r = _post(gw, big)
    assert r.status_code == 413 and _error(r)["code"] == "payload_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        yield big[:100]
        yield big[100:]

    # Without a Content-Length the limit still holds.
    r = httpx.post(gw.url + "/v1/chat/completions", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413


def test_content_type_is_checked(gw: GatewayProcess) -> None:
    r = _post(gw, b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and _error(r)["code"] == "unsupported_media_type"
    r = _post(gw, b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}',
              headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_unknown_route_and_method(gw: GatewayProcess) -> None:
    r = httpx.get(gw.url + "/v1/nope")
    assert r.status_code == 404 and _error(r)["code"] == "route_not_found"
    r = httpx.get(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"


def test_request_id_honoured_or_generated(gw: GatewayProcess) -> None:
    r = _post(gw, orjson_dumps(CHAT), headers={"x-request-id": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    r = _post(gw, orjson_dumps(CHAT), headers={"x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"].startswith("req_")
    assert "gateway;dur=" in r.headers["server-timing"]
    assert "trace-abc.123" in gw.logs()


def test_a_bug_is_a_500_and_the_process_lives(gw: GatewayProcess) -> None:
    r = _post(gw, b'{"model": "buggy", "messages": [{"role": "user", "content": "x"}]}')
    assert r.status_code == 500
    err = _error(r)
    assert err["code"] == "internal_error" and err["type"] == "api_error"
    assert _post(gw, orjson_dumps(CHAT)).status_code == 200
    assert "Traceback" in gw.logs()  # the bug is logged for the operator


def test_upstream_failure_is_502_or_503_openai_shaped(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="down", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code in (502, 503)
    assert info.value.code is not None and info.value.code.startswith(("upstream", "no_healthy"))


def test_cors_off_by_default(gw: GatewayProcess) -> None:
    r = httpx.get(gw.url + "/v1/models", headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_when_enabled(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(_config(cors={"enabled": True, "allow_origins": ["https://app.example"]}))
    r = httpx.options(gw.url + "/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.get(gw.url + "/v1/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics_and_health(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="who", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(gw.url + "/metrics").text
    series = 'hapax_requests_total{model="demo",protocol="h1",provider="demo",route="chat_completions",status="200"}'
    assert f"{series} 2" in text
    # An unknown model name never becomes a label value.
    assert 'model="who"' not in text
    assert ('hapax_errors_total{code="model_not_found",model="none",route="chat_completions",'
            'type="invalid_request_error"} 1') in text
    assert 'hapax_tokens_total{direction="output",model="demo",provider="demo"}' in text
    assert 'hapax_time_to_first_token_seconds_count{model="demo",provider="demo"} 1' in text
    assert "hapax_gateway_overhead_seconds_bucket" in text
    assert "hapax_requests_in_flight 1" in text  # the scrape itself
    ready = httpx.get(gw.url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "demo" in ready.json()["providers"]
    assert httpx.get(gw.url + "/health/live").json() == {"status": "live"}


def test_access_log_has_no_prompt(gw: GatewayProcess) -> None:
    secret_prompt = "my-private-prompt-4242"
    r = _post(gw, orjson_dumps({"model": "demo", "messages": [{"role": "user", "content": secret_prompt}]}))
    assert r.status_code == 200
    entry = _access_line(gw, r.headers["x-request-id"])
    logs = gw.logs()
    assert entry["status"] == 200 and entry["model"] == "demo" and entry["completion_tokens"] > 0
    assert secret_prompt not in logs


def test_log_bodies_when_configured(gateway: Callable[..., GatewayProcess]) -> None:
    cfg = _config()
    cfg["logging"] = {"log_bodies": True}
    gw = gateway(cfg)
    prompt = "debug-me-prompt-777"
    r = _post(gw, orjson_dumps({"model": "demo", "messages": [{"role": "user", "content": prompt}]}))
    assert r.status_code == 200
    entry = _access_line(gw, r.headers["x-request-id"])
    assert prompt in entry["request_body"]
    assert "Hello from Hapax! You said: " + prompt in entry["response_body"]


def _access_line(gw: GatewayProcess, request_id: str) -> dict[str, object]:
    """The access-log entry of one request, waiting (bounded) for the line to be written."""
    deadline = time.monotonic() + 5
    while request_id not in gw.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(ln for ln in gw.logs().splitlines() if request_id in ln and '"hapax.access"' in ln)
    return json.loads(line)  # type: ignore[no-any-return]


def orjson_dumps(obj: object) -> bytes:
    import orjson

    return orjson.dumps(obj)
