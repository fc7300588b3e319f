"""The ``personavec`` command line: a thin face over the library, one module per stage.

Results go to stdout (a rich table, or one JSON document with ``--json``); progress and logs go to
stderr. A :class:`~personavec.core.errors.PersonavecError` becomes one ``error: ...`` line and exit code 2;
Ctrl-C one ``interrupted`` line and exit code 130.
Layer flags use the convention of :mod:`personavec.core.layers` (0 = embeddings, l = output of block l).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, overload

import typer
from rich.console import Console

from personavec.core.errors import PersonavecError

app = typer.Typer(
    help="Persona vectors: extract, monitor and steer character traits.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

MODEL_OPT = typer.Option(
    None, "--model", "-m", help="smollm2-135m (default), a HF id, a folder or a .gguf file."
)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")
JUDGE_OPT = typer.Option(
    None, help="Trait judge: embedding (default, offline), local[:MODEL], openai:MODEL, anthropic:MODEL."
)
COHERENCE_JUDGE_OPT = typer.Option(
    None, "--coherence-judge", help="Coherence judge: perplexity (default, offline) or as --judge."
)


@overload
def friendly(fn: F) -> F: ...


@overload
def friendly(*, resumable: bool) -> Callable[[F], F]: ...


def friendly(fn: F | None = None, *, resumable: bool = False) -> F | Callable[[F], F]:
    """Turn PersonavecError into one line on stderr and exit code 2, and Ctrl-C into one line and 130.

    Use as ``@friendly``, or ``@friendly(resumable=True)`` for commands whose finished work sits in caches
    in their output folder, so that the Ctrl-C line says running them again resumes.
    """
    hint = ": finished batches are saved, the same command resumes" if resumable else ""

    def decorate(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except PersonavecError as e:
                err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                err.print(f"[bold yellow]interrupted[/]{hint}", highlight=False, markup=True)
                raise typer.Exit(130) from None

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


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


def load(model: str | None, quiet: bool = False) -> Any:
    from transformers.utils import logging as hf_logging

    from personavec.core.models import load_model

    hf_logging.disable_progress_bar()  # our own status line says what is happening
    t0 = time.perf_counter()
    with err.status(f"loading {model or 'the embedded model'} ...") if not quiet else _null():
        lm = load_model(model)
    err.print(f"loaded {lm.info.id} in {time.perf_counter() - t0:.1f}s", highlight=False)
    return lm


def model_for(vectors: list[Any], model: str | None) -> str | None:
    """The model spec to load for vectors: ``--model`` if given, else the one they were made on."""
    from personavec.core.models import EMBEDDED_ID

    if model is not None:
        return model
    made_on = {str(v.meta.model_id) for v in vectors} - {""}
    if len(made_on) > 1:
        raise PersonavecError(
            f"the vectors were made on different models ({', '.join(sorted(made_on))}): pass --model"
        )
    only = made_on.pop() if made_on else None
    # The embedded model records its hub id, but is loaded through its alias (no hub needed).
    return None if only in (None, EMBEDDED_ID) else only


def load_vector_and_model(vector_path: Any, model: str | None) -> tuple[Any, Any]:
    """Load a vector and its model, and check they belong together (one clear line if not)."""
    from personavec.core.vectors import PersonaVector

    vector = PersonaVector.load(vector_path)
    lm = load(model_for([vector], model))
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    if vector.meta.model_fingerprint and vector.meta.model_fingerprint != lm.info.fingerprint:
        err.print(
            f"warning: vector was made on {vector.meta.model_id} "
            f"(fingerprint {vector.meta.model_fingerprint}); "
            f"{lm.info.id} has the same shape but other weights ({lm.info.fingerprint})",
            highlight=False,
        )
    return vector, lm


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_a: object) -> None:
        return None


def main() -> None:
    """Entry point for ``python -m personavec``."""
    app()


# Importing the command modules registers their commands on `app`.
from personavec.cli import core as _core  # noqa: E402, F401
from personavec.cli import data as _data  # noqa: E402, F401
from personavec.cli import experiment as _experiment  # noqa: E402, F401
from personavec.cli import extract as _extract  # noqa: E402, F401
from personavec.cli import finetune as _finetune  # noqa: E402, F401
from personavec.cli import monitor as _monitor  # noqa: E402, F401
from personavec.cli import screen as _screen  # noqa: E402, F401
from personavec.cli import screen_experiment as _screen_experiment  # noqa: E402, F401
from personavec.cli import serve as _serve  # noqa: E402, F401
from personavec.cli import steer as _steer  # noqa: E402, F401
from personavec.cli import traits as _traits  # noqa: E402, F401
