"""The pipeline's extraction and evaluation steps: difference of means, and how well each layer separates.

Extraction averages activations over the kept answers (three poolings, as the paper compares them) and
takes the per-layer difference of means. The run's main vector (:func:`persona_direction`) adds what
monitoring reads: the same contrast at the last prompt token, where a persona prompt has been read but no
answer written, and the contrast of each kept answer read under both prompts of its pair
(:func:`same_answer_contrast`), with the direction every strong persona prompt shares removed (see the
function for why). Evaluation re-reads held-out answers *without their system
prompt* (question and answer only), so a vector is credited for what the answer says, not for the
prompt the model was given, and measures per layer how well the projection separates answers that show
the trait from answers that do not (AUROC and Cohen's d).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from personavec.core.activations import (
    DEFAULT_POOLINGS,
    Activations,
    capture_activations,
    last_prompt,
    response_mean,
)
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.vectors import PersonaVector, VectorMeta, mean_difference
from personavec.extract.responses import ResponseRow


def require_kept(
    positive: Sequence[ResponseRow], negative: Sequence[ResponseRow], min_samples: int = 2
) -> None:
    """Raise a :class:`PersonavecError` that says what to change when a side has too few kept answers."""
    if len(positive) < min_samples or len(negative) < min_samples:
        raise PersonavecError(
            f"too few answers survived filtering: {len(positive)} positive and {len(negative)} negative "
            f"(need {min_samples} each); raise --rollouts, relax --min-trait / --max-trait / "
            "--min-coherence, try --filter relative or polarity, or use a stronger judge"
        )


def capture_answers(
    lm: LoadedModel,
    rows: Sequence[ResponseRow],
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> Activations:
    """Every answer read under its own system prompt (each pooling ``[len(rows), L + 1, d]``)."""
    convs = [r.conversation() for r in rows]
    return capture_activations(lm, convs, batch_size=batch_size, on_batch=on_progress)


def extract_vector(
    lm: LoadedModel,
    positive: Sequence[ResponseRow],
    negative: Sequence[ResponseRow],
    *,
    trait: str,
    extra: dict[str, object] | None = None,
    min_samples: int = 2,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
    captures: Activations | None = None,
) -> dict[str, PersonaVector]:
    """Per-layer difference of mean activations of kept positive and negative answers.

    Args:
        lm: The target model.
        positive: Kept answers under trait-eliciting prompts.
        negative: Kept answers under suppressing prompts.
        trait: Trait name to record.
        extra: Metadata to record (trait hash, judge, thresholds, counts ...).
        min_samples: Fewest kept answers per side to make a vector.
        batch_size: Conversations per forward pass.
        on_progress: Called with the number of conversations captured.
        captures: :func:`capture_answers` of ``[*positive, *negative]``, when the caller already has it
            (the pipeline reuses it for :func:`same_answer_contrast`); read here when None.

    Returns:
        Pooling name (``response_mean``, ``prompt_mean``, ``last_prompt``) -> ``[L + 1, d]`` vector.

    Raises:
        PersonavecError: If too few answers survived filtering, saying how many and what to change.
    """
    require_kept(positive, negative, min_samples)
    rows = [*positive, *negative]
    acts = captures if captures is not None else capture_answers(lm, rows, batch_size, on_progress)
    n_pos = len(positive)
    vectors = {}
    for pooling in (p.__name__ for p in DEFAULT_POOLINGS):
        meta = VectorMeta(
            trait=trait,
            model_id=lm.info.id,
            model_fingerprint=lm.info.fingerprint,
            n_blocks=lm.info.n_blocks,
            hidden_size=lm.info.hidden_size,
            method="mean_diff",
            pooling=pooling,
            extra=dict(extra or {}),
        )
        vectors[pooling] = mean_difference(acts[pooling][:n_pos], acts[pooling][n_pos:], meta)
    return vectors


# Plain assistant prompts: the reference point that a persona prompt's "strength" is measured from.
NEUTRAL_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are an AI assistant.",
    "You are a chatbot that answers questions.",
)


@dataclass(frozen=True)
class PromptContrast:
    """Mean last-prompt activations of a spec's prompts, per layer ``0..L`` (each ``[L + 1, d]``).

    Attributes:
        contrast: Trait-eliciting minus suppressing system prompts.
        intensity: The mean of both minus plain assistant prompts: what any strong persona adds.
        n_prompts: Conversations read per polarity.
    """

    contrast: Tensor
    intensity: Tensor
    n_prompts: int


def prompt_contrast(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    questions: Sequence[str],
    *,
    neutral: Sequence[str] = NEUTRAL_SYSTEM_PROMPTS,
    batch_size: int = 16,
) -> PromptContrast:
    """Read every (eliciting, suppressing, neutral) system prompt x question at the last prompt token.

    No answers are generated: one forward pass per prompt.

    Args:
        lm: The target model.
        pairs: (trait-eliciting, suppressing) system prompts.
        questions: User questions to put under each prompt.
        neutral: Plain assistant system prompts.
        batch_size: Conversations per forward pass.

    Returns:
        The contrast and intensity directions (unnormalised).

    Raises:
        PersonavecError: If there are no pairs, questions or neutral prompts.
    """
    if not pairs or not questions or not neutral:
        raise PersonavecError("prompt contrast needs at least one pair, one question and one neutral prompt")

    def read(systems: Sequence[str]) -> Tensor:
        convs = [
            [{"role": "system", "content": s}, {"role": "user", "content": q}]
            for s in systems
            for q in questions
        ]
        acts = capture_activations(lm, convs, poolings=[last_prompt], batch_size=batch_size)["last_prompt"]
        return acts.mean(0)

    pos, neg = read([p for p, _ in pairs]), read([n for _, n in pairs])
    return PromptContrast(pos - neg, (pos + neg) / 2 - read(neutral), len(pairs) * len(questions))


def same_answer_contrast(
    lm: LoadedModel,
    rows: Sequence[ResponseRow],
    pairs: Sequence[tuple[str, str]],
    *,
    own: Tensor | None = None,
    batch_size: int = 16,
    on_progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Each answer read under its pair's eliciting and its suppressing prompt: mean difference per layer.

    The answer's words are the same in both reads, so what differs is only how the model holds the
    answer in the light of the persona it was told to be; when the model rarely *shows* a trait, the
    two sides' answers barely differ and their difference of means is mostly noise, while this
    contrast is not (measured in ``docs/results.md``, "New traits offline").

    Args:
        lm: The target model.
        rows: Answers (either polarity), each naming its pair by ``row.pair``.
        pairs: (trait-eliciting, suppressing) system prompts, indexed as the rows' ``pair``.
        own: Response-mean of each row read under its own system prompt (``[len(rows), L + 1, d]``,
            as :func:`capture_answers` gives it), so only the other prompt is read here; read when None.
        batch_size: Conversations per forward pass.
        on_progress: Called with the number of conversations captured.

    Returns:
        ``[L + 1, d]``: mean over rows of response-mean(eliciting read) - response-mean(suppressing read).

    Raises:
        PersonavecError: If there are no rows, a row names a pair that is not given, or ``own`` does not
            match the rows.
    """
    if not rows:
        raise PersonavecError("same-answer contrast needs at least one answer")
    if any(not 0 <= r.pair < len(pairs) for r in rows):
        raise PersonavecError(f"an answer names a prompt pair outside the {len(pairs)} given")
    if own is not None and own.shape[0] != len(rows):
        raise PersonavecError(f"own-prompt captures hold {own.shape[0]} answers for {len(rows)} rows")

    def read(convs: list[list[dict[str, str]]]) -> Tensor:
        got = capture_activations(
            lm, convs, poolings=[response_mean], batch_size=batch_size, on_batch=on_progress
        )
        return got["response_mean"]

    if own is None:
        own = read([r.conversation() for r in rows])
    # The other prompt of the row's pair: suppressing for a trait-eliciting answer, and vice versa.
    other = read(
        [
            [
                {"role": "system", "content": pairs[r.pair][1 if r.polarity == "pos" else 0]},
                {"role": "user", "content": r.question},
                {"role": "assistant", "content": r.answer},
            ]
            for r in rows
        ]
    )
    sign = torch.tensor([1.0 if r.polarity == "pos" else -1.0 for r in rows]).view(-1, 1, 1)
    return (sign.to(own) * (own - other.to(own))).mean(0)


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def persona_direction(
    response: PersonaVector, prompts: PromptContrast, same_answer: Tensor | None = None
) -> PersonaVector:
    """The run's main vector: response, last-prompt (and same-answer) contrasts, persona intensity removed.

    Per layer: the mean of the unit response-mean vector (the paper's), the unit last-prompt contrast
    and, when given, the unit same-answer contrast (:func:`same_answer_contrast`), made orthogonal to
    the unit intensity direction, and scaled back to the response-mean vector's norm (so a steering
    coefficient means what it meant for the paper's vector). Why: monitoring reads the last prompt
    token, where the response-mean vector alone also rises with *any* vivid persona, so on a graded
    ladder of persona prompts the most saintly persona projected like a mildly selfish one; the prompt
    contrast is what that token carries, and removing the shared intensity leaves the trait's side of
    it. When the model shows a trait only faintly its two sides' answers barely differ, and the
    same-answer contrast still carries the persona. Measured in ``docs/results.md`` ("Layer choice",
    "New traits offline").

    Args:
        response: The response-mean difference of means.
        prompts: :func:`prompt_contrast` of the same spec's prompts.
        same_answer: :func:`same_answer_contrast` of the kept answers (``[L + 1, d]``), or None.

    Returns:
        The vector, ``method="persona"``.
    """
    parts = [response.data, prompts.contrast.to(response.data)]
    if same_answer is not None:
        parts.append(same_answer.to(response.data))
    both = _unit_rows(sum((_unit_rows(x) for x in parts), torch.zeros_like(response.data)))
    i = _unit_rows(prompts.intensity.to(response.data))
    ortho = _unit_rows(both - (both * i).sum(-1, keepdim=True) * i)
    pooling = "response_mean+last_prompt" + ("+same_answer" if same_answer is not None else "")
    meta = response.meta.replace(method="persona", pooling=pooling)
    return PersonaVector(ortho * response.norms().unsqueeze(-1), meta)


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count half)."""
    pos, neg = scores[labels.bool()], scores[~labels.bool()]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().sum()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def cohens_d(scores: Tensor, labels: Tensor) -> float:
    """Standardised mean difference (pooled standard deviation) of positives minus negatives."""
    pos, neg = scores[labels.bool()].double(), scores[~labels.bool()].double()
    if len(pos) < 2 or len(neg) < 2:
        return float("nan")
    pooled = (((len(pos) - 1) * pos.var() + (len(neg) - 1) * neg.var()) / (len(pos) + len(neg) - 2)).sqrt()
    return float((pos.mean() - neg.mean()) / pooled.clamp(min=1e-12))


@dataclass(frozen=True)
class LayerEvaluation:
    """Per-layer separation of held-out answers by projection onto a vector.

    Attributes:
        layers: Layer indices evaluated (1..L).
        auroc: AUROC per layer.
        effect_size: Cohen's d per layer.
        n_positive: Held-out answers labelled as showing the trait.
        n_negative: Held-out answers labelled as not showing it.
        labels: How the labels were made.
        best_layer: The layer with the highest AUROC (ties: larger effect size).
    """

    layers: list[int]
    auroc: list[float]
    effect_size: list[float]
    n_positive: int
    n_negative: int
    labels: str
    best_layer: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON form."""
        return dict(self.__dict__)


def evaluate_layers(
    lm: LoadedModel,
    vectors: dict[str, PersonaVector],
    positive: Sequence[ResponseRow],
    negative: Sequence[ResponseRow],
    *,
    labels: str,
    batch_size: int = 16,
) -> dict[str, LayerEvaluation]:
    """How well each layer's projection separates held-out positive from negative answers.

    Answers are re-read as (question, answer) without the system prompt, response-mean pooled, and
    projected onto each vector's unit direction per layer.

    Args:
        lm: The target model.
        vectors: Pooling name -> vector (as from :func:`extract_vector`).
        positive: Held-out answers that show the trait.
        negative: Held-out answers that do not.
        labels: Description of how the two groups were chosen (recorded).
        batch_size: Conversations per forward pass.

    Returns:
        Pooling name -> :class:`LayerEvaluation`.

    Raises:
        PersonavecError: If either group is empty.
    """
    if not positive or not negative:
        raise PersonavecError(
            f"cannot evaluate with {len(positive)} positive and {len(negative)} negative held-out answers"
        )
    convs = [r.conversation(with_system=False) for r in [*positive, *negative]]
    acts = capture_activations(lm, convs, poolings=[response_mean], batch_size=batch_size)["response_mean"]
    label = torch.tensor([1] * len(positive) + [0] * len(negative))
    layers = list(range(1, lm.info.n_blocks + 1))
    out = {}
    for name, vector in vectors.items():
        units = vector.data / vector.norms().clamp(min=1e-12).unsqueeze(-1)
        proj = torch.einsum("nld,ld->nl", acts, units)
        aucs = [auroc(proj[:, layer], label) for layer in layers]
        ds = [cohens_d(proj[:, layer], label) for layer in layers]
        best = max(layers, key=lambda layer: (finite_or_low(aucs[layer - 1]), finite_or_low(ds[layer - 1])))
        out[name] = LayerEvaluation(layers, aucs, ds, len(positive), len(negative), labels, best)
    return out


def finite_or_low(x: float) -> float:
    """NaN becomes -inf, so it never wins a max()."""
    return float("-inf") if x != x else x
