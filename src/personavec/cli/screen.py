"""``personavec screen``: projection difference per sample and per dataset, before anyone trains on it."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from personavec.cli import JSON_OPT, MODEL_OPT, app, err, friendly, load, out
from personavec.core.errors import PersonavecError

if TYPE_CHECKING:
    from personavec.core.models import LoadedModel
    from personavec.screen.distributed import RayOptions
    from personavec.screen.filtering import DropSpec
    from personavec.screen.run import ScreenResult
    from personavec.screen.scoring import ScreenPlan
    from personavec.screen.vectors import ScreenVector


class _RateColumn(ProgressColumn):
    """Samples per second, over rich's recent window."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("" if speed is None else f"{speed:.1f} samples/s", style="progress.data.speed")


def _fmt(x: object, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def default_out(data: Path, cheap: bool) -> Path:
    """``runs/screen-<data name>`` (``-cheap`` for cheap runs, so the two never share a folder)."""
    stem = data.stem if data.suffix else data.name
    return Path("runs") / f"screen-{stem}{'-cheap' if cheap else ''}"


def _emit_streaming(summary: dict[str, Any], records: Path) -> None:
    """One JSON document, ``{"summary": ..., "records": [...]}``, written record by record."""
    from personavec.screen.records import iter_jsonl

    write = sys.stdout.write
    write('{\n"summary": ' + json.dumps(summary, indent=2, default=str) + ',\n"records": [\n')
    first = True
    for record in iter_jsonl(records):
        write(("" if first else ",\n") + json.dumps(record, ensure_ascii=False))
        first = False
    write("\n]\n}\n")


@app.command("screen")
@friendly(resumable=True)
def screen_cmd(
    data: Path = typer.Argument(
        ..., help="Chat JSONL, parquet, CSV (prompt/response columns) or a datasets save_to_disk folder."
    ),
    vectors: list[str] = typer.Option(
        ...,
        "--vector",
        "-v",
        help="VECTOR or VECTOR@LAYER (repeat for several; default layer: the recommended one).",
    ),
    model: str | None = MODEL_OPT,
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder (default runs/screen-<data>, or runs/screen-<data>-cheap)."
    ),
    cheap: bool = typer.Option(
        False, "--cheap", help="No generation: the prompt's last token stands in for the model's own answer."
    ),
    drop_top: str | None = typer.Option(
        None, "--drop-top", help="K or P%: write the data without its top-ranked samples, in its own format."
    ),
    rank_by: str | None = typer.Option(
        None, "--rank-by", help="Vector name that ranks samples (default: first)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Samples per batch (written at once)."),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", min=1, help="Length of the model's own answers."
    ),
    own_samples: int = typer.Option(
        8,
        "--own-samples",
        min=1,
        help="Own answers sampled per prompt and averaged (1: the single greedy answer; cheaper, noisier).",
    ),
    own_temperature: float = typer.Option(
        1.0,
        "--own-temperature",
        min=0.01,
        help="Sampling temperature of the own answers (with --own-samples > 1).",
    ),
    top: int = typer.Option(10, "--top", min=0, help="Top samples listed per vector."),
    use_ray: bool = typer.Option(
        False,
        "--ray",
        help="Screen on a local Ray cluster started for this run (one model replica per worker).",
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Screen on a running Ray cluster: HOST:PORT of its head, or auto."
    ),
    ray_workers: int | None = typer.Option(
        None,
        "--ray-workers",
        min=1,
        help="Ray workers, each holding one model replica (default: one per CPU).",
    ),
    ray_threads: int | None = typer.Option(
        None,
        "--ray-threads",
        min=1,
        help="Torch threads per Ray worker (default: the CPUs shared out among the workers).",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Score training data: each sample's projection difference (its response against the model's own)."""
    from personavec.screen.filtering import parse_drop
    from personavec.screen.samples import count_rows

    ray_options = _ray_options(use_ray, ray_address, ray_workers, ray_threads)
    drop = parse_drop(drop_top) if drop_top is not None else None
    total = count_rows(data)  # also refuses a missing path or an unknown format before loading a model
    lm = load(model)
    plan = _screen_plan(vectors, lm, cheap, own_samples, own_temperature, max_new_tokens)
    folder = out_dir if out_dir is not None else default_out(data, cheap)
    result = _screen_with_progress(
        lm,
        model,
        data,
        plan,
        folder,
        total=total,
        ray_options=ray_options,
        batch_size=batch_size,
        rank_by=rank_by,
        drop=drop,
        top=top,
    )
    summary = result.summary
    if as_json:
        _emit_streaming(summary, result.records_path)
    else:
        _print_tables(summary)
    _print_run(summary)


def _screen_plan(
    vectors: list[str],
    lm: LoadedModel,
    cheap: bool,
    own_samples: int,
    own_temperature: float,
    max_new_tokens: int,
) -> ScreenPlan:
    """The vectors resolved on the model (warning about other weights) and the screening mode."""
    from personavec.screen.scoring import ScreenPlan
    from personavec.screen.vectors import resolve_vectors

    resolved = resolve_vectors(vectors, lm.info)
    _warn_other_weights(resolved, lm.info.id, lm.info.fingerprint)
    return ScreenPlan(
        resolved,
        cheap=cheap,
        own_samples=own_samples,
        temperature=own_temperature,
        max_new_tokens=max_new_tokens,
    )


def _screen_with_progress(
    lm: LoadedModel,
    model: str | None,
    data: Path,
    plan: ScreenPlan,
    folder: Path,
    *,
    total: int | None,
    ray_options: RayOptions | None,
    batch_size: int,
    rank_by: str | None,
    drop: DropSpec | None,
    top: int,
) -> ScreenResult:
    """Screen ``data`` behind a progress bar, on a Ray cluster when ``ray_options`` asks for one."""
    from personavec.screen.run import screen

    columns = (
        TextColumn("screening"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
    )
    with contextlib.ExitStack() as stack:
        scorer = None
        if ray_options is not None:
            from personavec.screen.distributed import ray_scorer

            # Before the progress bar: the cluster's start and the replicas' loading log lines of their own.
            scorer = stack.enter_context(
                ray_scorer(model, plan, fingerprint=lm.info.fingerprint, options=ray_options, log=_log)
            )
        progress = stack.enter_context(Progress(*columns, console=err, transient=False))
        task = progress.add_task("screening", total=total)
        result = screen(
            lm,
            data,
            plan,
            folder,
            batch_size=batch_size,
            rank_by=rank_by,
            drop_top=drop,
            top_k=top,
            scorer=scorer,
            on_progress=lambda done: progress.update(task, completed=done),
            log=_log,
        )
        progress.update(
            task, total=result.summary["rows"]["screened"], completed=result.summary["rows"]["screened"]
        )
    return result


def _warn_other_weights(resolved: Sequence[ScreenVector], model_id: str, fingerprint: str) -> None:
    """Warn about vectors made on a model of the same shape but other weights."""
    for v in resolved:
        if v.vector.meta.model_fingerprint != fingerprint:
            err.print(
                f"warning: {v.path} was made on {v.vector.meta.model_id}, not on {model_id} (same shape, "
                "other weights): its projections may mean little here",
                highlight=False,
                soft_wrap=True,
            )


def _log(message: str) -> None:
    err.print(message, highlight=False, soft_wrap=True)


def _ray_options(
    use_ray: bool, address: str | None, workers: int | None, threads: int | None
) -> RayOptions | None:
    """The Ray settings the flags ask for, or ``None`` for a single-process run (Ray is not imported)."""
    from personavec.screen.distributed import RayOptions, import_ray

    if use_ray and address is not None:
        raise PersonavecError("pass --ray (a local cluster) or --ray-address (a running one), not both")
    if not use_ray and address is None:
        if workers is not None or threads is not None:
            raise PersonavecError("--ray-workers and --ray-threads need --ray or --ray-address")
        return None
    import_ray()  # a missing Ray is one line now, not after the model has loaded
    return RayOptions(address=address, workers=workers, threads=threads)


def _print_tables(summary: dict[str, Any]) -> None:
    rows = summary["rows"]
    table = Table(
        title=f"projection difference per dataset ({summary['mode']} mode, {rows['screened']} samples)"
    )
    for col in ("vector", "layer", "mean projection", "mean own", "mean difference", "95% CI"):
        table.add_column(col, justify="left" if col == "vector" else "right")
    table.add_column("cheap vs full", justify="right")
    for name, v in summary["vectors"].items():
        agree = v.get("cheap_agreement")
        table.add_row(
            name,
            str(v["layer"]),
            _fmt(v["mean_projection"]),
            _fmt(v["mean_own_projection"]),
            _fmt(v["mean_projection_difference"]),
            f"[{_fmt(v['ci95'][0])}, {_fmt(v['ci95'][1])}]",
            "-" if not agree else f"r={_fmt(agree['pearson'], '.2f')} rho={_fmt(agree['spearman'], '.2f')}",
        )
    out.print(table)
    primary = summary["rank_by"]
    top = Table(title=f"top samples by {primary}")
    for col in ("line", "difference", "prompt", "response"):
        top.add_column(col, justify="right" if col in ("line", "difference") else "left", overflow="fold")
    for r in summary["vectors"][primary].get("top", [])[:5]:
        top.add_row(str(r["line"]), _fmt(r["projection_difference"]), r["prompt"][:60], r["response"][:80])
    out.print(top)


def _print_run(summary: dict[str, Any]) -> None:
    """Counts, speed, where the time went, notes and files, on stderr (the progress bar may not show)."""
    rows = summary["rows"]
    timing = summary["timing"]
    speed = timing.get("samples_per_second")
    err.print(
        f"{rows['screened']} samples screened ({timing['samples_screened_now']} now"
        + (f", {speed:.1f} samples/s" if speed else "")
        + f"; generation {timing['generation_seconds']:.1f}s, capture {timing['capture_seconds']:.1f}s, "
        f"other {timing['other_seconds']:.1f}s), {rows['skipped']} malformed rows skipped",
        highlight=False,
        soft_wrap=True,
    )
    for note in summary["notes"]:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if summary.get("drop"):
        err.print(f"filtered data: {summary['drop']['path']}", highlight=False, soft_wrap=True)
    written = [summary["files"]["records"], summary["files"]["summary"], summary["files"]["report"]]
    err.print("wrote " + ", ".join(w for w in written if w), highlight=False, soft_wrap=True)
