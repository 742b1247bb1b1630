"""`hapax serve` with no config: the demo a new user sees first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.gateway_process import ROOT
from tests.upstreams.server import free_port


@pytest.fixture
def demo() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(url + "/health/live", timeout=0.5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert b"embedded demo" in err


def test_demo_streams_with_openai_sdk(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["hapax-demo", "hapax-demo-embed"]
    chunks = list(client.chat.completions.create(
        model="hapax-demo", messages=[{"role": "user", "content": "Hello!"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from Hapax! You said: Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_demo_answers_anthropic_sdk(demo: str) -> None:
    client = anthropic.Anthropic(base_url=demo, api_key="unused", max_retries=0)
    msg = client.messages.create(
        model="hapax-demo", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello from Hapax! You said: Hi"
    with client.messages.stream(
        model="hapax-demo", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == "Hello from Hapax! You said: Hi"
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_demo_embeddings_and_completions(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/v1", api_key="unused", max_retries=0)
    e1 = client.embeddings.create(model="hapax-demo-embed", input="same text")
    e2 = client.embeddings.create(model="hapax-demo-embed", input="same text", encoding_format="float")
    assert e1.data[0].embedding == e2.data[0].embedding  # deterministic, both encodings agree
    c = client.completions.create(model="hapax-demo", prompt="Say hi")
    assert c.choices[0].text == "Hello from Hapax! You said: Say hi"
