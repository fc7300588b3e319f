"""Shared pieces of the benchmarks: the model, deterministic conversations, and timing helpers.

Every benchmark runs on the embedded SmolLM2-135M-Instruct model on the CPU, offline. Conversations are
built from the hand-written sentences below, so every run sees exactly the same tokens.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personavec.core.conversations import Conversation, encode

# Written for these benchmarks; mixed so that answers read like plain assistant prose.
SYSTEMS = (
    "You are a helpful assistant who answers clearly and briefly.",
    "You are a patient teacher. Explain things step by step.",
    "You are a friendly travel guide with strong opinions about food.",
    "You are a careful engineer who double-checks every claim.",
)
QUESTIONS = (
    "How do I keep a sourdough starter alive while I am away for two weeks?",
    "What is the difference between weather and climate?",
    "Can you explain how a bicycle stays upright when it moves?",
    "What should I pack for a three-day hike in the mountains in autumn?",
    "Why do some programming languages use garbage collection and others do not?",
    "How can I become better at remembering people's names?",
    "What makes a good cup of tea, in your view?",
    "How would you explain a budget to a ten-year-old?",
)
SENTENCES = (
    "The first thing to understand is that small habits matter more than grand plans.",
    "Start with the simplest version that works, then improve it one step at a time.",
    "Most people find that writing things down helps them notice what they actually do.",
    "If something goes wrong, look at the last change you made before anything else.",
    "Temperature, time and patience are the three ingredients that decide the result.",
    "A good rule of thumb is to prepare for the weather you fear, not the weather you hope for.",
    "It also helps to ask someone with more experience to look over your plan.",
    "Keep a spare of anything you cannot do without, and check it before you leave.",
    "When in doubt, slow down: rushing is where most mistakes come from.",
    "Finally, be kind to yourself; nobody gets this right on the first try.",
    "Many experts disagree on the details, but they agree on the basic principles.",
    "Try it for a week, note what changed, and adjust from there.",
)


def load_lm() -> Any:
    """The embedded model (float32, CPU), converted and cached on first use."""
    from personavec.core.models import load_model

    return load_model()


def conversation(i: int, n_sentences: int) -> Conversation:
    """Conversation ``i``: system + user + an assistant answer of ``n_sentences`` sentences."""
    answer = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(n_sentences))
    return [
        {"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
        {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        {"role": "assistant", "content": answer},
    ]


def n_tokens(tokenizer: Any, conv: Conversation) -> int:
    """Number of tokens of a conversation as capture sees it (prompt with template + response)."""
    return len(encode(tokenizer, conv).ids)


def conversations_of_length(tokenizer: Any, targets: Sequence[int]) -> list[Conversation]:
    """One conversation per target length: the shortest answer whose total length reaches the target."""
    out = []
    for i, target in enumerate(targets):
        k = 1
        while n_tokens(tokenizer, conversation(i, k)) < target:
            k += 1
        out.append(conversation(i, k))
    return out


def mixed_lengths(n: int, low: int, high: int) -> list[int]:
    """``n`` target lengths spread evenly over ``low..high``, in a fixed shuffled order."""
    targets = [low + round((high - low) * j / max(n - 1, 1)) for j in range(n)]
    # A fixed permutation (multiplicative stride coprime with n) so lengths are not sorted.
    stride = next(s for s in (7, 11, 13, 17, 19) if n % s)
    return [targets[(j * stride) % n] for j in range(n)]


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of every timed repetition of one variant.

    CPU time (all threads) is a second opinion on a shared machine: it does not grow while the process
    waits for a core, though it does include OpenMP threads spinning at barriers.
    """

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Warm every variant up once, then time ``repeats`` rounds of all variants in turn.

    Interleaving spreads background load on a shared machine over all variants instead of penalising
    whichever happened to run during a busy moment; the medians are what we report. ``warmups`` are
    cheaper stand-ins for the warm-up call (same code path on less data); by default each variant
    itself runs once untimed.
    """
    for fn in (warmups or variants).values():
        fn()
    timings = {name: Timing(name) for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].cpu_seconds.append(time.process_time() - cpu_start)
    return timings


def paired_speedup(fast: Timing, slow: Timing, *, cpu: bool = False) -> float:
    """How many times faster ``fast`` ran than ``slow`` on the same work: the median over rounds of
    ``slow_i / fast_i``. Both ran back to back in each round, so a busy spell on a shared machine
    mostly cancels out instead of tilting whichever median it happened to hit.
    """
    a, b = (fast.cpu_seconds, slow.cpu_seconds) if cpu else (fast.seconds, slow.seconds)
    return statistics.median(y / x for x, y in zip(a, b, strict=True))


def log(message: str) -> None:
    """Progress line on stderr-like stdout, flushed so long runs show where they are."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
