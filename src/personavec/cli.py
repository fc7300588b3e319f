"""The ``personavec`` command line: a thin face over the library.

Results go to stdout (a rich table, or one JSON document with ``--json``); progress and logs go to
stderr. A :class:`~personavec.errors.PersonavecError` becomes one ``error: ...`` line and exit code 2.
Layer flags use the convention of :mod:`personavec.layers` (0 = embeddings, l = output of block l).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from personavec import __version__
from personavec.errors import PersonavecError

app = typer.Typer(
    help="Persona vectors: extract, monitor and steer character traits.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
vector_app = typer.Typer(help="Inspect, import and export vector files.", no_args_is_help=True)
app.add_typer(vector_app, name="vector")

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

MODEL_OPT = typer.Option(
    None, "--model", "-m", help="smollm2-135m (default), a HF id, a folder or a .gguf file."
)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


def friendly(fn: F) -> F:
    """Turn PersonavecError into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonavecError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def parse_layers(text: str | None) -> list[int] | None:
    """Parse ``"5"``, ``"3,7,9"`` or ``"10-12"`` into layer indices."""
    if text is None:
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                layers.extend(range(int(lo), int(hi) + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise PersonavecError(f"cannot parse layers '{text}': use e.g. 12 or 10,12 or 10-14") from None
    return layers


def _load(model: str | None, quiet: bool = False) -> Any:
    from transformers.utils import logging as hf_logging

    from personavec.models import load_model

    hf_logging.disable_progress_bar()  # our own status line says what is happening
    t0 = time.perf_counter()
    with err.status(f"loading {model or 'the embedded model'} ...") if not quiet else _null():
        lm = load_model(model)
    err.print(f"loaded {lm.info.id} in {time.perf_counter() - t0:.1f}s", highlight=False)
    return lm


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_a: object) -> None:
        return None


@app.command()
@friendly
def version() -> None:
    """Print the personavec version."""
    out.print(__version__)


@app.command()
@friendly
def info(model: str | None = MODEL_OPT, as_json: bool = JSON_OPT) -> None:
    """Load a model and describe it (blocks, width, layer convention)."""
    from personavec.models import cache_dir

    t0 = time.perf_counter()
    lm = _load(model)
    seconds = time.perf_counter() - t0
    data = {
        **lm.info.to_dict(),
        "valid_layers": f"0..{lm.info.n_blocks}",
        "load_seconds": round(seconds, 2),
        "cache_dir": str(cache_dir()),
        "layer_convention": "index 0 = embeddings, index l = output of decoder block l",
    }
    if as_json:
        emit_json(data)
        return
    table = Table(title="model", show_header=False)
    for k, v in data.items():
        table.add_row(k, str(v))
    out.print(table)


@app.command()
@friendly
def demo(
    model: str | None = MODEL_OPT,
    prompt: str = typer.Option("How should I treat my little brother?", help="User message to answer."),
    layer: int | None = typer.Option(None, help="Layer to steer (default: the middle block)."),
    coef: float = typer.Option(2.0, help="Steering strength (negative steers away)."),
    save: Path | None = typer.Option(None, help="Also save the demo vector to this .safetensors file."),
    as_json: bool = JSON_OPT,
) -> None:
    """Build a quick cruel-vs-kind vector from built-in examples and show a steered answer."""
    from personavec.demo import run_demo

    lm = _load(model)
    with err.status("capturing activations and generating ..."):
        result = run_demo(lm, prompt, layer=layer, coef=coef)
    if save is not None:
        result.vector.save(save)
        err.print(f"saved {save}")
    data = {
        "prompt": result.prompt,
        "layer": result.layer,
        "coef": result.coef,
        "unsteered": result.unsteered,
        "steered": result.steered,
        "vector_norm_at_layer": round(float(result.vector.at(result.layer).norm()), 3),
    }
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"{result.prompt!r}  (layer {result.layer}, coef {result.coef:g})")
    table.add_column("unsteered", ratio=1)
    table.add_column(f"steered toward '{result.vector.meta.trait}'", ratio=1)
    table.add_row(result.unsteered, result.steered)
    out.print(table)


@vector_app.command("show")
@friendly
def vector_show(path: Path, as_json: bool = JSON_OPT) -> None:
    """Print a vector file's metadata and per-layer norms."""
    from personavec.vectors import PersonaVector

    v = PersonaVector.load(path)
    data = {"path": str(path), "meta": v.meta.__dict__, "norms": [round(x, 4) for x in v.norms().tolist()]}
    if as_json:
        emit_json(data)
        return
    table = Table(title=str(path), show_header=False)
    for k, val in v.meta.__dict__.items():
        table.add_row(k, json.dumps(val) if isinstance(val, dict) else str(val))
    table.add_row("norms (layer: norm)", ", ".join(f"{i}: {n:.2f}" for i, n in enumerate(v.norms().tolist())))
    out.print(table)


@vector_app.command("import-pt")
@friendly
def vector_import_pt(
    path: Path,
    out_path: Path = typer.Option(..., "--out", help="Destination .safetensors file."),
    trait: str = typer.Option(..., help="Trait name to record."),
    model_id: str = typer.Option("unknown", help="Model the vector was made on."),
) -> None:
    """Import a .pt vector from the paper's research code ([L+1, d], row 0 = embeddings)."""
    from personavec.interop import import_research_pt

    v = import_research_pt(path, trait=trait, model_id=model_id)
    v.save(out_path)
    err.print(f"wrote {out_path} ({v.meta.n_blocks} blocks x {v.meta.hidden_size})")


@vector_app.command("export-gguf")
@friendly
def vector_export_gguf(
    path: Path,
    out_path: Path = typer.Option(..., "--out", help="Destination .gguf file."),
    layers: str | None = typer.Option(None, help="Layers to export, e.g. 10-20 (default 2..L)."),
) -> None:
    """Export a vector as a GGUF control vector for llama.cpp (--control-vector) and repeng."""
    from personavec.interop import export_gguf
    from personavec.vectors import PersonaVector

    v = PersonaVector.load(path)
    export_gguf(v, out_path, layers=parse_layers(layers))
    err.print(f"wrote {out_path}")


@vector_app.command("import-gguf")
@friendly
def vector_import_gguf(
    path: Path,
    out_path: Path = typer.Option(..., "--out", help="Destination .safetensors file."),
    model: str | None = MODEL_OPT,
    trait: str = typer.Option("imported", help="Trait name to record."),
) -> None:
    """Import a GGUF control vector (repeng / llama.cpp) for a model."""
    from personavec.interop import import_gguf

    lm = _load(model)
    v = import_gguf(
        path,
        n_blocks=lm.info.n_blocks,
        hidden_size=lm.info.hidden_size,
        trait=trait,
        model_id=lm.info.id,
        model_fingerprint=lm.info.fingerprint,
    )
    v.save(out_path)
    err.print(f"wrote {out_path}")


def main() -> None:
    """Entry point for ``python -m personavec``."""
    app()
