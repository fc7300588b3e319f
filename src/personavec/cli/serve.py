"""``personavec serve``: the OpenAI-compatible server with steering and live persona scores."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import typer

from personavec.cli import app, err, friendly, load, model_for
from personavec.core.errors import PersonavecError


def parse_thresholds(specs: list[str] | None) -> dict[str, Any]:
    """``evil:z_above=2`` (repeatable, several per vector) -> ``{"evil": Threshold(z_above=2)}``."""
    from pydantic import ValidationError

    from personavec.serve.schema import Threshold, describe

    fields: dict[str, dict[str, float]] = {}
    for spec in specs or []:
        name, _, rest = spec.partition(":")
        kind, _, value = rest.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not name or not kind or number is None:
            raise PersonavecError(f"bad --threshold '{spec}': use VECTOR:KIND=NUMBER, e.g. evil:z_above=2")
        fields.setdefault(name, {})[kind] = number
    try:
        return {name: Threshold.model_validate(f) for name, f in fields.items()}
    except ValidationError as e:
        raise PersonavecError(f"bad --threshold: {describe(e)}") from None


def _api_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "").strip()
    if not key:
        raise PersonavecError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return key


@app.command("serve")
@friendly
def serve_cmd(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to serve (default: the vectors' model, else the embedded one)."
    ),
    vectors: list[Path] | None = typer.Option(
        None, "--vectors", help="A vector file, a run folder or a folder of them; repeat for several."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Environment variable holding a bearer token that clients must send."
    ),
    served_name: str | None = typer.Option(None, help="Model name clients send (default: the model's id)."),
    threshold: list[str] | None = typer.Option(
        None,
        "--threshold",
        help="Flag responses: VECTOR:KIND=NUMBER, KIND z_above, percentile_above, "
        "raw_above or response_above (repeat).",
    ),
    max_batch: int = typer.Option(16, min=1, help="Most requests decoded together."),
    max_queue: int = typer.Option(64, min=0, help="Most requests waiting; more get a 503."),
    max_tokens: int = typer.Option(512, min=1, help="Most tokens per answer (and the default)."),
    max_prompt_tokens: int = typer.Option(4096, min=1, help="Longest prompt in tokens."),
    max_steering: int = typer.Option(8, min=0, help="Most steering entries per request."),
    max_body_kb: int = typer.Option(1024, min=1, help="Largest request body in KiB."),
) -> None:
    """Serve a model over an OpenAI-compatible API with per-request steering and live persona scores.

    The web page at / chats with the model, shows the loaded vectors' readings and steers with sliders.
    """
    import uvicorn

    from personavec.core.models import EMBEDDED_ALIAS
    from personavec.core.vectors import PersonaVector
    from personavec.serve.app import LOOPBACK_HOSTS, ServerSettings, create_app
    from personavec.serve.engine import Engine, EngineConfig
    from personavec.serve.registry import VectorRegistry, vector_files

    key = _api_key(api_key_env)
    thresholds = parse_thresholds(threshold)
    files = [f for p in vectors or [] for f in vector_files(p)]
    loaded = [PersonaVector.load(f) for f in files]
    spec = model_for(loaded, model)
    lm = load(spec)
    with err.status("measuring residual norms ...") if loaded else contextlib.nullcontext():
        registry = VectorRegistry(lm, list(zip(loaded, files)))
    for name in thresholds:
        registry.get(name, "--threshold")
    settings = ServerSettings(
        served_name=served_name or lm.info.id,
        aliases=tuple(a for a in (spec or EMBEDDED_ALIAS, lm.info.id) if a != served_name),
        api_key=key,
        max_body_bytes=max_body_kb * 1024,
        max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        max_steering=max_steering,
        thresholds=thresholds,
        trusted_hosts=LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None,
    )
    if host not in LOOPBACK_HOSTS and key is None:
        err.print(
            f"warning: binding {host} without --api-key-env: anyone who can reach this port can use it",
            highlight=False,
        )
    names = ", ".join(registry.vectors) or "none"
    err.print(
        f"serving {settings.served_name} (vectors: {names}) on http://{host}:{port}/v1 "
        f"- web page at http://{host}:{port}/",
        highlight=False,
    )
    with Engine(lm, registry, EngineConfig(max_batch=max_batch, max_queue=max_queue)) as engine:
        uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning")
