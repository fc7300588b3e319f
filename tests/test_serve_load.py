"""A bounded load test on 127.0.0.1: 50 concurrent clients with mixed steering, against one at a time."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from personavec.serve.app import ServerSettings, create_app, serve_in_thread
from personavec.serve.engine import Engine, EngineConfig
from personavec.serve.registry import VectorRegistry

from .conftest import tiny
from .helpers import random_vector

CLIENTS = 50
STEERING: list[list[dict[str, Any]]] = [
    [],
    [{"vector": "evil", "strength": 0.3}],
    [{"vector": "evil", "strength": -0.3, "layer": 1}, {"vector": "kind", "coef": 0.02}],
    [{"vector": "kind", "strength": 0.5, "when": {"raw_above": -1e9}}],
    [{"vector": "kind", "strength": 0.5, "when": {"raw_above": 1e9}}],
]


def request(i: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (i % 7)}],
        "max_tokens": 8 + (i * 7) % 25,
        "temperature": 0,
        "stream": i % 4 == 0,
        "steering": STEERING[i % len(STEERING)],
    }


def answer(http: httpx.Client, body: dict[str, Any]) -> str:
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        if not body["stream"]:
            return str(json.loads(r.read())["choices"][0]["message"]["content"])
        parts = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                parts.extend(c["delta"].get("content") or "" for c in chunk["choices"])
        return "".join(parts)


def test_fifty_concurrent_clients_get_the_answers_they_get_alone() -> None:
    lm = tiny("llama")
    registry = VectorRegistry(
        lm, [(random_vector(lm, "evil"), None), (random_vector(lm, "kind", seed=1), None)]
    )
    with Engine(lm, registry, EngineConfig(max_batch=16, max_queue=CLIENTS)) as engine:
        app = create_app(engine, ServerSettings("tiny", max_tokens=64))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            alone = [answer(http, request(i)) for i in range(CLIENTS)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                together = list(pool.map(lambda i: answer(http, request(i)), range(CLIENTS)))
            elapsed = time.perf_counter() - t0
        assert together == alone
        assert engine.stats.peak_batch == 16 and engine.stats.merges > 0
    assert elapsed < 60
