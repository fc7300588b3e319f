"""Core commands: model info, the demo, and vector files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from personavec import __version__
from personavec.cli import (
    JSON_OPT,
    MODEL_OPT,
    app,
    emit_json,
    err,
    friendly,
    load,
    load_vector_and_model,
    out,
    parse_layers,
)

vector_app = typer.Typer(help="Inspect, import and export vector files.", no_args_is_help=True)
app.add_typer(vector_app, name="vector")


@app.command()
@friendly
def version() -> None:
    """Print the personavec version."""
    out.print(__version__)


@app.command()
@friendly
def info(model: str | None = MODEL_OPT, as_json: bool = JSON_OPT) -> None:
    """Load a model and describe it (blocks, width, layer convention)."""
    from personavec.core.models import cache_dir

    t0 = time.perf_counter()
    lm = load(model)
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
    from personavec.steer.demo import run_demo

    lm = load(model)
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
    from personavec.core.vectors import PersonaVector

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
    from personavec.core.interop import import_research_pt

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
    from personavec.core.interop import export_gguf
    from personavec.core.vectors import PersonaVector

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
    from personavec.core.interop import import_gguf

    lm = load(model)
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


@vector_app.command("bake")
@friendly
def vector_bake(
    vector_path: Path = typer.Argument(..., help="A vector .safetensors file."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the baked transformers model."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to bake into (default: the one the vector was made on)."
    ),
    layer: int | None = typer.Option(
        None, help="Layer to steer (default: the vector's stored choice, else its recommended layer)."
    ),
    coef: float | None = typer.Option(
        None, help="Strength in vector units (default: the stored choice's, else 1.0); negative steers away."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Write a plain transformers model folder whose weights carry the steering (for vLLM, TGI, llama.cpp)."""
    from personavec.steer.bake import check_destination, save_baked

    check_destination(out_dir)  # before the slow model load
    vector, lm = load_vector_and_model(vector_path, model)
    with err.status("baking ..."):
        record = save_baked(lm, vector, out_dir, layer, coef, vector_path=vector_path)
    if as_json:
        emit_json(record)
        return
    baked = record["baked_model"]
    table = Table(title=f"baked '{vector.meta.trait}' into {out_dir}", show_header=False)
    table.add_row("layer", f"{record['layer']} ({record['layer_source']})")
    table.add_row("coef", f"{record['coef']:g}")
    table.add_row("how", baked["how"])
    table.add_row("architecture", f"{record['base_model']['architecture']} -> {baked['architecture']}")
    table.add_row(
        "added parameters",
        f"{baked['added_parameters']:,} ({baked['added_bytes'] / 1e6:.2f} MB, {baked['added_fraction']:.3%})",
    )
    table.add_row(
        "load with", f"AutoModelForCausalLM.from_pretrained('{out_dir}') or any transformers server"
    )
    out.print(table)
