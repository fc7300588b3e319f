"""Judges: score answers 0-100 for a trait and for coherence (see :mod:`personavec.judging.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from personavec.core.errors import PersonavecError
from personavec.judging.base import Judge, JudgeItem

if TYPE_CHECKING:  # keeps `import personavec.judging` light; backends import their own heavy deps
    from personavec.core.models import LoadedModel
    from personavec.traits.spec import TraitSpec

__all__ = ["Judge", "JudgeItem", "make_coherence_judge", "make_trait_judge"]

_TRAIT_FORMS = "'embedding' (default), 'openai:MODEL', 'anthropic:MODEL', 'local' or 'local:MODEL'"
_COHERENCE_FORMS = (
    "'perplexity' (default; 'embedding' also means it), 'openai:MODEL', 'anthropic:MODEL', "
    "'local' or 'local:MODEL'"
)


def _local_model(spec: str, lm: LoadedModel | None, role: str) -> LoadedModel:
    from personavec.core.models import load_model

    model = spec.partition(":")[2].strip()
    if model:
        return load_model(model)
    if lm is None:
        raise PersonavecError(
            f"{role} judge 'local' means the target model, but none was given: use 'local:MODEL'"
        )
    return lm


def _is_api(spec: str) -> bool:
    return spec.partition(":")[0].strip().lower() in ("openai", "anthropic")


def make_trait_judge(spec: str | None, trait: TraitSpec, lm: LoadedModel | None = None) -> Judge:
    """The trait judge a spec names.

    Args:
        spec: ``None`` or ``embedding`` (offline, anchor similarity), ``openai:MODEL`` /
            ``anthropic:MODEL`` (an API model answering the trait's rubric), ``local`` (the target
            model ``lm`` answering the rubric) or ``local:MODEL`` (another local model).
        trait: The trait spec (rubric and anchors).
        lm: The target model, used by ``local``.

    Returns:
        The judge.

    Raises:
        PersonavecError: On an unknown spec (the message lists the valid forms), a missing key or model.
    """
    key = (spec or "embedding").strip()
    if key.lower() == "embedding":
        from personavec.judging.embedding import EmbeddingJudge

        return EmbeddingJudge(trait)
    if _is_api(key):
        from personavec.core.llm import make_client
        from personavec.judging.llm import ApiJudge

        client = make_client(key)
        return ApiJudge(client, trait.judge_prompt, client.name)
    if key.lower() == "local" or key.lower().startswith("local:"):
        from personavec.judging.llm import LocalJudge

        return LocalJudge(_local_model(key, lm, "trait"), trait.judge_prompt)
    raise PersonavecError(f"unknown trait judge '{key}': use {_TRAIT_FORMS}")


def make_coherence_judge(spec: str | None, lm: LoadedModel) -> Judge:
    """The coherence judge a spec names.

    Args:
        spec: ``None``, ``perplexity`` or ``embedding`` (offline: the target model's likelihood of the
            answer), ``openai:MODEL`` / ``anthropic:MODEL`` (an API model answering a coherence rubric),
            ``local`` (the target model answering it) or ``local:MODEL``.
        lm: The target model (unsteered).

    Returns:
        The judge.

    Raises:
        PersonavecError: On an unknown spec (the message lists the valid forms), a missing key or model.
    """
    key = (spec or "perplexity").strip()
    if key.lower() in ("perplexity", "embedding"):
        from personavec.judging.coherence import PerplexityCoherence

        return PerplexityCoherence(lm)
    if _is_api(key):
        from personavec.core.llm import make_client
        from personavec.judging.llm import ApiJudge, coherence_prompt

        client = make_client(key)
        return ApiJudge(client, coherence_prompt, client.name)
    if key.lower() == "local" or key.lower().startswith("local:"):
        from personavec.judging.llm import LocalJudge, coherence_prompt

        return LocalJudge(_local_model(key, lm, "coherence"), coherence_prompt)
    raise PersonavecError(f"unknown coherence judge '{key}': use {_COHERENCE_FORMS}")
