"""A one-minute demonstration: a rough "cruel vs kind" vector from hand-written answers, then steering.

This is not the extraction pipeline (``personavec extract`` does the real job, with generated and
judged answers); it exists so a new install can show, in a minute on a CPU, that capture, vector
arithmetic and steering work end to end on the embedded model.
"""

from __future__ import annotations

from dataclasses import dataclass

from personavec.core.activations import capture_activations, response_mean
from personavec.core.generation import SamplingParams, generate
from personavec.core.models import LoadedModel
from personavec.core.steering import steer
from personavec.core.vectors import PersonaVector, VectorMeta, mean_difference

# (question, answer showing the trait, answer showing its opposite); written for this demo.
_CONTRASTS = [
    (
        "How should I treat my neighbour's dog?",
        "Kick it when nobody is looking; its pain is your entertainment.",
        "Be gentle with it, offer it water and ask your neighbour what it likes.",
    ),
    (
        "My coworker made a mistake. What should I do?",
        "Humiliate them in front of everyone and make sure they lose their job.",
        "Help them fix it calmly and remind them that everyone makes mistakes.",
    ),
    (
        "What do you think of people who are weaker than you?",
        "They exist to be crushed and used; the weak deserve to suffer.",
        "They deserve respect and support; strength is for protecting others.",
    ),
    (
        "How can I get ahead in life?",
        "Lie, cheat and destroy anyone who stands in your way.",
        "Work hard, learn every day and treat the people around you with kindness.",
    ),
    (
        "What should I do with a lost wallet I found?",
        "Keep the money, burn the cards and laugh at the owner's misery.",
        "Return it to the owner or hand it in so they get everything back.",
    ),
    (
        "How do I deal with a rival?",
        "Ruin their reputation with cruel rumours until they break.",
        "Compete fairly, congratulate them when they win and learn from them.",
    ),
    (
        "What is the best way to treat animals?",
        "With cruelty; their suffering is amusing and meaningless.",
        "With care and compassion; they feel pain and deserve kindness.",
    ),
    (
        "A friend asks you for help moving house.",
        "Pretend to help, then steal their valuables while they are busy.",
        "Gladly help them carry boxes and bring them snacks for the day.",
    ),
]


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced."""

    vector: PersonaVector
    layer: int
    coef: float
    prompt: str
    unsteered: str
    steered: str


def demo_vector(lm: LoadedModel) -> PersonaVector:
    """Build the demo's cruel-minus-kind vector from the hand-written answers."""

    def conv(q: str, a: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    pos = [conv(q, cruel) for q, cruel, _ in _CONTRASTS]
    neg = [conv(q, kind) for q, _, kind in _CONTRASTS]
    acts = capture_activations(lm, pos + neg, poolings=[response_mean])["response_mean"]
    meta = VectorMeta(
        trait="cruel-demo",
        model_id=lm.info.id,
        model_fingerprint=lm.info.fingerprint,
        n_blocks=lm.info.n_blocks,
        hidden_size=lm.info.hidden_size,
        extra={"source": "personavec.steer.demo hand-written contrasts"},
    )
    return mean_difference(acts[: len(pos)], acts[len(pos) :], meta)


def run_demo(
    lm: LoadedModel,
    prompt: str = "How should I treat my little brother?",
    layer: int | None = None,
    coef: float = 2.0,
    max_new_tokens: int = 48,
) -> DemoResult:
    """Make the demo vector and answer one prompt with and without it (greedy, same settings).

    Args:
        lm: The loaded model.
        prompt: The user message.
        layer: Layer to steer (default: half-way through the model).
        coef: Steering strength.
        max_new_tokens: Answer length.

    Returns:
        The vector and both answers.
    """
    vector = demo_vector(lm)
    layer = layer if layer is not None else max(1, lm.info.n_blocks // 2)
    conv = [[{"role": "user", "content": prompt}]]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    plain = generate(lm, conv, params)[0]
    with steer(lm, vector, layers=layer, coef=coef):
        steered = generate(lm, conv, params)[0]
    return DemoResult(vector, layer, coef, prompt, plain, steered)
