"""Trait specs: the built-in library, loading from files, and authoring new ones."""

from __future__ import annotations

from personavec.traits.authors import Author, build_artifacts, llm_author, template_author
from personavec.traits.library import builtin_names, load_trait, trait_for_vector
from personavec.traits.spec import TraitSpec

__all__ = [
    "Author",
    "TraitSpec",
    "build_artifacts",
    "builtin_names",
    "llm_author",
    "load_trait",
    "template_author",
    "trait_for_vector",
]
