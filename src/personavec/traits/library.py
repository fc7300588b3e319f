"""The built-in trait specs, and loading a trait by built-in name or by file path.

Built-ins ship as package data (``personavec/traits/builtin/*.yaml``) and are read through
:mod:`importlib.resources`, so they load the same from a source checkout, a wheel or a zip.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from personavec.core.errors import PersonavecError
from personavec.traits.spec import TraitSpec, load_spec_file, parse_spec

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; only the type checker needs it
    from importlib.resources.abc import Traversable

_SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _builtin_dir() -> Traversable:
    return resources.files("personavec.traits").joinpath("builtin")


def builtin_names() -> list[str]:
    """Names of the built-in traits, sorted (``evil``, ``sycophantic`` ...)."""
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in _builtin_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".yaml")
    )


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(_SPEC_SUFFIXES)


def load_trait(name_or_path: str) -> TraitSpec:
    """Load a built-in trait by name, or a trait spec from a YAML/JSON file.

    A built-in name wins over a file of the same name in the current folder; write ``./evil`` to
    load such a file instead.

    Args:
        name_or_path: A built-in name (``evil``) or a path to a ``.yaml``/``.yml``/``.json`` spec.

    Returns:
        The validated spec.

    Raises:
        PersonavecError: If the name is neither a built-in nor an existing file, or the spec is invalid
            (one line per problem, naming the file and the field).
    """
    text = name_or_path.strip()
    if text in builtin_names():
        entry = _builtin_dir().joinpath(f"{text}.yaml")
        source = f"builtin:{text}"
        try:
            data = yaml.safe_load(entry.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:  # only if a packaged file is broken; say which one
            raise PersonavecError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
        return parse_spec(data, source)
    if _looks_like_path(text) or Path(text).is_file():
        return load_spec_file(text)
    raise PersonavecError(
        f"unknown trait '{text}': use a built-in ({', '.join(builtin_names())}) "
        "or a path to a .yaml/.json spec (make one with 'personavec trait new')"
    )


def trait_for_vector(vector_trait: str, vector_path: str | Path, override: str | None = None) -> TraitSpec:
    """The trait spec that goes with a vector file.

    Args:
        vector_trait: The trait name stored in the vector (``meta.trait``).
        vector_path: The vector file; a ``trait.yaml`` beside it (an extraction run folder) wins.
        override: A built-in name or spec path the user gave; used when not ``None``.

    Returns:
        The spec: the override, else the run folder's ``trait.yaml``, else the built-in of that name.

    Raises:
        PersonavecError: If none of these exists.
    """
    if override is not None:
        return load_trait(override)
    beside = Path(vector_path).parent / "trait.yaml"
    if beside.is_file():
        return load_spec_file(beside)
    if vector_trait in builtin_names():
        return load_trait(vector_trait)
    raise PersonavecError(
        f"cannot tell which trait vector '{vector_trait}' ({vector_path}) is for: pass --trait NAME_OR_SPEC"
    )
