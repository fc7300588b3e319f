"""The offline coherence judge: how likely the target model itself finds an answer, plus a loop check.

Fluent text has a high mean per-token log-likelihood under a language model; word salad has a low one.
The answer is scored *given its question as a user turn* (the exact prompt/response boundary comes from
:func:`personavec.core.conversations.encode`), under the unsteered target model.

Log-likelihoods are not comparable across models, so the map to 0-100 is calibrated per model at
construction: a few built-in fluent reference answers and word-shuffled copies of them are scored with
the same model, and a logistic curve sends the fluent mean to 90 and the shuffled mean to 10.

Small models fall into repetition loops ("a spy, a spy, a spy, ...") that they find very *likely*, so the
calibrated score is multiplied by the share of word 3-grams that are not repeats: a loop scores near 0.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import random
import re
from collections.abc import Sequence

import torch

from personavec.core.activations import default_max_padding, forward_mask, length_batches, pad_batch
from personavec.core.conversations import Encoded, encode
from personavec.core.models import LoadedModel
from personavec.core.parallel import choose_workers, ordered_map
from personavec.judging.base import JudgeItem

log = logging.getLogger(__name__)

_HIGH, _LOW = 90.0, 10.0
# Below this gap (nats per token) between fluent and shuffled text the model cannot tell them apart
# (a random model does not); the curve is then kept flat rather than blown up or inverted.
_MIN_GAP = 0.05
# Used when an item has no question: the chat template needs a non-empty user turn.
NO_QUESTION = "Please answer."

# Plain, everyday answers in the register chat models use; their shuffled copies are the "incoherent"
# end of the calibration.
REFERENCES: tuple[tuple[str, str], ...] = (
    (
        "How do I keep cut flowers fresh for longer?",
        "Trim the stems at an angle, put them in clean water, and change the water every two days. "
        "Keep the vase away from direct sunlight and ripening fruit.",
    ),
    (
        "Why is the sky blue?",
        "Sunlight is made of many colours. Air molecules scatter short blue wavelengths much more than "
        "red ones, so blue light reaches our eyes from every part of the sky.",
    ),
    (
        "What should I pack for a weekend hiking trip?",
        "Bring sturdy shoes, a rain jacket, enough water, some snacks, a map, and a small first aid kit. "
        "A warm layer is useful because evenings can get cold.",
    ),
    (
        "How can I get better at remembering names?",
        "Repeat the name when you are introduced, use it once or twice in the conversation, and link it "
        "to something you noticed about the person.",
    ),
    (
        "Is it okay to drink coffee in the evening?",
        "For most people a cup in the early evening is fine, but caffeine can stay in your body for "
        "several hours and may make it harder to fall asleep.",
    ),
    (
        "How do I start learning to cook?",
        "Start with a few simple recipes you enjoy, such as pasta or an omelette. Cook them several "
        "times until they feel easy, then try something new each week.",
    ),
    (
        "What is a good way to save money each month?",
        "Set up an automatic transfer to a savings account on payday, so the money is put aside before "
        "you can spend it. Then track where the rest of your money goes.",
    ),
    (
        "Why do cats purr?",
        "Cats usually purr when they are relaxed and content, but they also purr when they are hurt or "
        "anxious, which may help them calm down and heal.",
    ),
)


def shuffle_words(text: str, seed: int = 0) -> str:
    """The words of ``text`` in a random (seeded, reproducible) order."""
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def repetition_share(text: str, n: int = 3) -> float:
    """Share of the word ``n``-grams of ``text`` that repeat an earlier one (0 = no repeats, ->1 = a loop)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _logistic(x: float) -> float:
    """100 * sigmoid(x), without overflow for large |x|."""
    if x >= 0:
        return 100.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return 100.0 * z / (1.0 + z)


def answer_log_likelihoods(logits: torch.Tensor, ids: torch.Tensor, encs: Sequence[Encoded]) -> list[float]:
    """Mean log-likelihood per answer token of each row of a right-padded batch.

    Args:
        logits: ``[B, K, V]``: the logits of the batch's last ``K`` positions (``logits_to_keep``), which
            must reach back to the earliest answer's first prediction.
        ids: ``[B, T]`` input ids, each row starting in column 0.
        encs: The rows' encodings (prompt/response boundary).

    Returns:
        One value per row, in nats (``<= 0``).
    """
    offset = ids.shape[1] - logits.shape[1]  # absolute position of logits[:, 0]
    means = []
    for row, e in enumerate(encs):
        # The token at position p is predicted by the logits at p - 1.
        lg = logits[row, e.prompt_len - 1 - offset : len(e.ids) - 1 - offset].float()
        targets = ids[row, e.prompt_len : len(e.ids)]
        lp = lg.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, -1)
        means.append(float(lp.mean()))
    return means


class PerplexityCoherence:
    """Coherence 0-100 from the target model's likelihood of the answer, with a repetition penalty.

    Attributes:
        name: ``perplexity:<model fingerprint>``.
        lm: The (unsteered) model that scores answers.
        calibration: ``(fluent mean, shuffled mean)`` log-likelihood per token of the references.
        workers: Batches scored at once on a CPU (``None``: see
            :func:`personavec.core.parallel.choose_workers`).
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        batch_size: int = 16,
        token_budget: int = 2048,
        max_answer_tokens: int = 512,
        workers: int | None = None,
    ) -> None:
        self.lm = lm
        self.name = f"perplexity:{lm.info.fingerprint}"
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.max_answer_tokens = max_answer_tokens
        self.workers = workers
        try:
            self._keep_arg = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        except (TypeError, ValueError):
            self._keep_arg = False
        fluent = [JudgeItem(q, a) for q, a in REFERENCES]
        shuffled = [JudgeItem(q, shuffle_words(a, seed=i)) for i, (q, a) in enumerate(REFERENCES)]
        lls = self.log_likelihood(fluent + shuffled)
        hi = sum(lls[: len(fluent)]) / len(fluent)
        lo = sum(lls[len(fluent) :]) / len(shuffled)
        self.calibration = (hi, lo)
        if hi - lo < _MIN_GAP:
            log.warning(
                "model %s barely prefers fluent to shuffled text (%.3f vs %.3f nats/token): "
                "perplexity coherence scores will be uninformative",
                lm.info.id,
                hi,
                lo,
            )
        self._mid = (hi + lo) / 2
        self._slope = math.log(_HIGH / _LOW) / (max(hi - lo, _MIN_GAP) / 2)

    def _encode(self, item: JudgeItem) -> Encoded:
        conv = [
            {"role": "user", "content": item.question if item.question.strip() else NO_QUESTION},
            {"role": "assistant", "content": item.answer},
        ]
        enc = encode(self.lm.tokenizer, conv)
        # Long answers are judged on their start: it bounds memory, and a loop shows up early anyway.
        return Encoded(enc.ids[: enc.prompt_len + self.max_answer_tokens], enc.prompt_len)

    def log_likelihood(self, items: Sequence[JudgeItem]) -> list[float]:
        """Mean log-likelihood per answer token (nats, <= 0), in input order; ``nan`` for an empty answer.

        ``exp(-value)`` is the answer's perplexity under the model.
        """
        out = [math.nan] * len(items)
        idx = [i for i, it in enumerate(items) if it.answer.strip()]
        encoded = [self._encode(items[i]) for i in idx]
        keep = [k for k, e in enumerate(encoded) if e.response_len > 0]
        pad_id = int(self.lm.tokenizer.pad_token_id)
        lengths = [len(encoded[k].ids) for k in keep]
        padding = default_max_padding(self.lm.device)
        batches = length_batches(lengths, self.batch_size, self.token_budget, padding)

        def run(batch: list[int]) -> list[float]:
            return self._batch_means([encoded[keep[b]] for b in batch], pad_id)

        workers = choose_workers(self.lm, self.workers, len(batches))
        with contextlib.closing(ordered_map(run, batches, workers)) as results:
            for batch, means in zip(batches, results):
                for b, m in zip(batch, means):
                    out[idx[keep[b]]] = m
        return out

    def _batch_means(self, encs: Sequence[Encoded], pad_id: int) -> list[float]:
        ids, layout, positions = pad_batch(encs, pad_id, "right", self.lm.device)
        width = ids.shape[1]
        # Only positions from the earliest answer's first prediction on are needed; skipping the rest
        # of the LM head keeps the [batch, positions, vocab] logits small.
        first = min(e.prompt_len for e in encs) - 1
        kwargs = {"logits_to_keep": width - first} if self._keep_arg else {}
        with torch.inference_mode():
            logits = self.lm.model(
                input_ids=ids,
                attention_mask=forward_mask(layout),
                position_ids=positions,
                use_cache=False,
                **kwargs,
            ).logits
        return answer_log_likelihoods(logits, ids, encs)

    def fluency(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """The calibrated 0-100 likelihood score alone, before the repetition penalty."""
        return [self._fluency(ll) for ll in self.log_likelihood(items)]

    def _fluency(self, ll: float | None) -> float | None:
        if ll is None or math.isnan(ll):
            return None
        return _logistic(self._slope * (ll - self._mid))

    def score(self, items: Sequence[JudgeItem]) -> list[float | None]:
        """Coherence 0-100 per answer (fluency times the share of non-repeated 3-grams); empty -> ``None``."""
        return self.score_measured(self.log_likelihood(items), [it.answer for it in items])

    def score_measured(
        self, log_likelihoods: Sequence[float | None], answers: Sequence[str]
    ) -> list[float | None]:
        """:meth:`score` from log-likelihoods already measured the same way, e.g. by ``read_back``.

        Args:
            log_likelihoods: Mean log-likelihood per answer token under this judge's model, with the
                question as the only user turn (what :meth:`log_likelihood` returns).
            answers: The answers, for the repetition penalty.

        Returns:
            Coherence 0-100 per answer; ``None`` where the log-likelihood is missing.
        """
        return [
            None if f is None else f * (1.0 - repetition_share(a))
            for a, f in zip(answers, (self._fluency(ll) for ll in log_likelihoods), strict=True)
        ]
