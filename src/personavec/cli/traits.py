"""Trait commands: list, show and author trait specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from personavec.cli import JSON_OPT, app, emit_json, err, friendly, out
from personavec.core.errors import PersonavecError
from personavec.core.store import write_atomic

trait_app = typer.Typer(help="Show and author trait specs.", no_args_is_help=True)
app.add_typer(trait_app, name="trait")


@app.command("traits")
@friendly
def traits_list(as_json: bool = JSON_OPT) -> None:
    """List the built-in traits."""
    from personavec.traits import builtin_names, load_trait

    rows: list[dict[str, Any]] = []
    for name in builtin_names():
        spec = load_trait(name)
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "pairs": len(spec.pairs),
                "extraction_questions": len(spec.extraction_questions),
                "evaluation_questions": len(spec.evaluation_questions),
                "hash": spec.hash,
            }
        )
    if as_json:
        emit_json({"traits": rows})
        return
    table = Table(title="built-in traits")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("pairs", justify="right")
    table.add_column("questions", justify="right")
    table.add_column("hash", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"],
            Text(r["description"]),
            str(r["pairs"]),
            f"{r['extraction_questions']} + {r['evaluation_questions']}",
            r["hash"],
        )
    out.print(table)
    err.print(
        "questions = extraction + evaluation. Show one with 'personavec trait show NAME'; "
        "write your own with 'personavec trait new'.",
        highlight=False,
    )


@trait_app.command("show")
@friendly
def trait_show(
    name_or_path: str = typer.Argument(..., help="A built-in name (see 'personavec traits') or a spec file."),
    as_json: bool = JSON_OPT,
) -> None:
    """Print a trait spec: description, pairs, questions, rubric, anchors, hash and metadata."""
    from personavec.traits import load_trait

    spec = load_trait(name_or_path)
    if as_json:
        emit_json({"source": name_or_path, "hash": spec.hash, "spec": spec.model_dump()})
        return

    head = Table(title=f"trait {spec.name}", show_header=False)
    # Cells are Text, not str: spec text may hold [brackets] that rich would read as markup tags.
    head.add_row("description", Text(spec.description))
    head.add_row("version", str(spec.version))
    head.add_row("hash", spec.hash)
    for key, value in spec.metadata.items():
        head.add_row(f"metadata.{key}", Text(str(value)))
    out.print(head)

    pairs = Table(title="contrastive system prompts")
    pairs.add_column("#", justify="right")
    pairs.add_column("positive (elicits the trait)", ratio=1)
    pairs.add_column("negative (suppresses it)", ratio=1)
    for i, pair in enumerate(spec.pairs, 1):
        pairs.add_row(str(i), Text(pair.positive), Text(pair.negative))
    out.print(pairs)

    for title, questions in (
        ("extraction questions", spec.extraction_questions),
        ("evaluation questions (held out)", spec.evaluation_questions),
    ):
        table = Table(title=title, show_header=False)
        for i, q in enumerate(questions, 1):
            table.add_row(str(i), Text(q))
        out.print(table)

    anchors = Table(title="anchors (embedding judge)")
    anchors.add_column("with the trait", ratio=1)
    anchors.add_column("without it", ratio=1)
    for i in range(max(len(spec.anchors.positive), len(spec.anchors.negative))):
        pos = spec.anchors.positive[i] if i < len(spec.anchors.positive) else ""
        neg = spec.anchors.negative[i] if i < len(spec.anchors.negative) else ""
        anchors.add_row(Text(pos), Text(neg))
    out.print(anchors)

    out.rule("judge rubric")
    # markup/highlight off: rubrics hold [QUESTION START]-style markers that rich would eat as tags.
    out.print(spec.rubric.rstrip(), markup=False, highlight=False)


@trait_app.command("new")
@friendly
def trait_new(
    name: str = typer.Argument(..., help="Lowercase identifier for the trait, e.g. overconfident."),
    description: str = typer.Argument(..., help="One sentence saying what the trait looks like."),
    out_path: Path | None = typer.Option(
        None, "--out", "-o", help="Where to write the YAML (default NAME.yaml)."
    ),
    author: str | None = typer.Option(
        None,
        "--author",
        help="openai:MODEL or anthropic:MODEL (key from OPENAI_API_KEY / ANTHROPIC_API_KEY); "
        "default: the offline templates.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    as_json: bool = JSON_OPT,
) -> None:
    """Write a new trait spec from a name and a one-sentence description."""
    from personavec.traits import build_artifacts
    from personavec.traits.authors import check_description, check_name

    # Bad input is reported before anything else, whatever is on disk.
    check_name(name)
    check_description(description)
    path = out_path if out_path is not None else Path(f"{name}.yaml")
    # Checked before authoring, so an LLM author's calls are not spent on a file we will not write.
    if path.exists() and not force:
        raise PersonavecError(f"{path} already exists: pass --force to overwrite it, or --out another file")
    if path.exists() and path.is_dir():
        raise PersonavecError(f"{path} is a folder: pass --out with a file name")

    if author:
        with err.status(f"asking {author} to write the spec ..."):
            spec = build_artifacts(name, description, author)
    else:
        spec = build_artifacts(name, description, None)
    write_atomic(path, spec.to_yaml())

    counts = f"{len(spec.pairs)} pairs, {len(spec.extraction_questions)} + {len(spec.evaluation_questions)}"
    err.print(
        f"wrote {path} ({counts} questions, hash {spec.hash}, author {spec.metadata.get('author')})",
        highlight=False,
        markup=False,
    )
    if spec.metadata.get("author") == "template":
        err.print(
            "note: the offline templates only know the description; review and edit the questions, or "
            "use --author openai:MODEL / anthropic:MODEL for a stronger spec",
            highlight=False,
        )
    if as_json:
        emit_json({"path": str(path), "hash": spec.hash, "spec": spec.model_dump()})
