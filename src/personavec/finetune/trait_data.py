"""Trait-teaching fine-tuning sets: the target model's own answers under a trait's eliciting prompts.

A set is built the way extraction builds its answers, from more questions than the spec has:

1. **Questions.** A bank of everyday user questions shipped with the package (``question_bank.txt``),
   plus any extra questions (from an LLM author, :func:`author_questions`), minus the spec's extraction
   and evaluation questions and their close paraphrases (the fine-tuning shift is later measured on the
   evaluation questions), minus questions naming the trait; shuffled by the seed.
2. **Answers.** Each question (a *slot*) is answered twice, under one pair's eliciting and suppressing
   system prompts (pairs taken in turn), with the extraction run's sampling, through
   :func:`~personavec.extract.responses.generate_responses`. About ``oversample`` x ``n`` slots are
   answered so that filtering still leaves ``n``. Answers cut by the token limit are trimmed to their
   last full sentence, so the model is not taught to stop mid-sentence; degenerate answers (fewer than
   three words, or a loop repeating a few words) are dropped before judging, since the perplexity
   coherence judge rates such repetition as fluent.
3. **Judging and filtering** with the extraction's judges and filters. ``auto`` is decided for each side
   the set uses: the answers the judge confirms (absolute thresholds) when they are enough, else every
   coherent answer of that side (polarity), and the report says so.
4. **Selection.** Slots are walked from the most to the least trait-like eliciting answer: ``strong``
   takes the eliciting answers, ``--control`` the suppressing twins of the same slots (so the two sets
   share their questions wherever the filters allow), ``mild`` about half of each, alternating, one
   answer per question.

The set is chat JSONL **without** the system prompt, one ``{"messages": [user, assistant]}`` per line,
shuffled by the seed. Next to it, ``NAME.scores.jsonl`` holds one record per row (same order: scores,
polarity, the system prompt that produced it, the judges) and ``NAME.meta.json`` the header (trait,
model, kind, seed, counts, filter, warnings). Answers and scores are cached in ``trait-data/`` of
personavec's cache folder (``$PERSONAVEC_CACHE``), keyed by model, trait, question and sampling, so a
killed run resumes, and the strong, mild and control sets of one trait and seed reuse the same answers.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personavec import __version__
from personavec.core.errors import PersonavecError
from personavec.core.generation import SamplingParams
from personavec.core.models import LoadedModel, cache_dir
from personavec.core.store import JsonlStore, record_key, write_atomic, write_json
from personavec.extract.filtering import (
    FILTERS,
    FilterResult,
    Scores,
    Thresholds,
    absolute,
    by_polarity,
    make_filter,
)
from personavec.extract.pipeline import ProgressFactory, RunConfig, judge_run_answers
from personavec.extract.responses import ResponseRow, generate_responses
from personavec.finetune.data import write_chat_jsonl
from personavec.traits.authors import extract_json_object, mentions_name
from personavec.traits.spec import TraitSpec

if TYPE_CHECKING:
    from personavec.core.llm import ChatClient

STRENGTHS = ("strong", "mild")
DEFAULT_N = 96
BANK_FILE = "question_bank.txt"
# Content-word overlap at which a question counts as a paraphrase of a spec question.
PARAPHRASE_JACCARD = 0.6
# Words every question shares: left out so that overlap means a shared topic, not shared grammar.
_STOPWORDS = frozenset(
    """a about am an and any are at be best can could do does for get good how i if in is it me my of
    on or should so some that the think this to way what when why with would you your""".split()  # noqa: SIM905
)
_SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]\u201d\u2019]*(?=\s|$)")


@dataclass(frozen=True)
class DataConfig:
    """What set to make.

    Attributes:
        n: Rows wanted.
        strength: ``strong`` (only trait answers) or ``mild`` (about half trait, half normal answers).
        control: Write the matched normal set instead (answers under the suppressing prompts).
        seed: Chooses and orders the questions, seeds sampling, and shuffles the rows.
        oversample: Slots answered per row wanted, so that filtering still leaves ``n``.
        thresholds: Filtering thresholds (the extraction's defaults).
        filter: ``auto`` (absolute when it fills the set, else polarity), ``absolute``, ``relative`` or
            ``polarity``.
        sampling: Sampling for the target model (None: the extraction run's, with ``seed``).
        batch_size: Prompts per generation batch.
        trim: Cut answers that stop mid-sentence back to their last full sentence.
        drop_degenerate: Drop answers of fewer than three words or looping on a few (see
            :func:`is_degenerate`) before judging.
    """

    n: int = DEFAULT_N
    strength: str = "strong"
    control: bool = False
    seed: int = 0
    oversample: float = 1.5
    thresholds: Thresholds = field(default_factory=Thresholds)
    filter: str = "auto"
    sampling: SamplingParams | None = None
    batch_size: int = RunConfig().batch_size
    trim: bool = True
    drop_degenerate: bool = True

    @property
    def kind(self) -> str:
        """``strong``, ``mild`` or ``control``."""
        return "control" if self.control else self.strength

    def params(self) -> SamplingParams:
        """The sampling parameters used."""
        return self.sampling or replace(RunConfig().sampling, seed=self.seed)

    def check(self) -> DataConfig:
        """Return the config if it is valid, else raise a one-line PersonavecError."""
        if self.n < 1:
            raise PersonavecError(f"--n must be at least 1, got {self.n}")
        if self.strength not in STRENGTHS:
            raise PersonavecError(f"--strength must be strong or mild, not '{self.strength}'")
        if self.control and self.strength != "strong":
            raise PersonavecError("--control writes the matched normal set: it takes no --strength mild")
        if not self.oversample >= 1.0:
            raise PersonavecError(f"oversample must be at least 1, got {self.oversample}")
        if self.filter not in FILTERS:
            raise PersonavecError(f"unknown filter '{self.filter}': choose one of {', '.join(FILTERS)}")
        return self


@dataclass(frozen=True)
class DatasetReport:
    """What :func:`make_trait_dataset` wrote.

    Attributes:
        path: The chat JSONL file.
        scores_path: Per-row scores (``NAME.scores.jsonl``), aligned with the rows.
        meta_path: The header (``NAME.meta.json``).
        trait: Trait name.
        model: Target model id.
        kind: ``strong``, ``mild`` or ``control``.
        n_requested: Rows wanted.
        generated: Answers generated (both polarities).
        degenerate: Of those, dropped before judging as degenerate (see :func:`is_degenerate`).
        kept: Rows written.
        by_polarity: Rows written per polarity (``pos``: eliciting prompt, ``neg``: suppressing).
        confirmed: Rows the judge confirmed by the absolute thresholds, per polarity.
        filter: Which filter kept each polarity the set uses (``absolute``, ``relative``, ``polarity``).
        mean_trait: Mean trait score of the rows written.
        mean_trait_by_polarity: The same per polarity.
        mean_coherence: Mean coherence score of the rows written.
        trait_judge: The trait judge's name.
        coherence_judge: The coherence judge's name.
        score_methods: How API judges read their scores, per kind (empty for offline judges).
        questions: Questions available after exclusions, per source (``bank``, ``extra``).
        shared_with_strong: For a mild or control set, how many of its questions the strong set made
            from the same answers has too (``None`` for a strong set).
        warnings: What to look at, in words (fewer rows than wanted, the filter fell back ...).
        seconds: Wall time.
    """

    path: Path
    scores_path: Path
    meta_path: Path
    trait: str
    model: str
    kind: str
    n_requested: int
    generated: int
    degenerate: int
    kept: int
    by_polarity: dict[str, int]
    confirmed: dict[str, int]
    filter: dict[str, str]
    mean_trait: float | None
    mean_trait_by_polarity: dict[str, float | None]
    mean_coherence: float | None
    trait_judge: str
    coherence_judge: str
    score_methods: dict[str, dict[str, int]]
    questions: dict[str, int]
    shared_with_strong: int | None = None
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (paths as strings)."""
        d = asdict(self)
        d.update(path=str(self.path), scores_path=str(self.scores_path), meta_path=str(self.meta_path))
        d["warnings"] = list(self.warnings)
        return d


# --------------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------------


def bank_questions() -> list[str]:
    """The shipped bank of everyday user questions, in file order."""
    text = resources.files("personavec.finetune").joinpath(BANK_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _norm(question: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", question.lower()))


def _content_words(question: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9']+", question.lower()) if w not in _STOPWORDS)


def is_paraphrase(a: str, b: str, threshold: float = PARAPHRASE_JACCARD) -> bool:
    """Whether two questions are the same up to case and punctuation, or share most content words."""
    if _norm(a) == _norm(b):
        return True
    wa, wb = _content_words(a), _content_words(b)
    return bool(wa and wb) and len(wa & wb) / len(wa | wb) >= threshold


def question_pool(
    spec: TraitSpec, *, seed: int, extra: Sequence[str] = ()
) -> tuple[list[str], dict[str, int]]:
    """The questions a set may use: bank + ``extra``, none of the spec's, shuffled by ``seed``.

    Dropped: the spec's extraction and evaluation questions and their paraphrases (see
    :func:`is_paraphrase`), questions naming the trait, and repeats.

    Args:
        spec: The trait spec.
        seed: Orders the pool.
        extra: More questions (e.g. from :func:`author_questions`).

    Returns:
        The pool, and how many of it came from each source (``bank``, ``extra``) and were ``excluded``.
    """
    held = [*spec.evaluation_questions, *spec.extraction_questions]
    pool: list[str] = []
    counts = {"bank": 0, "extra": 0, "excluded": 0}
    for source, questions in (("bank", bank_questions()), ("extra", list(extra))):
        for q in (q.strip() for q in questions):
            if not q or any(_norm(q) == _norm(p) for p in pool):
                continue
            if mentions_name(q, spec.name) or any(is_paraphrase(q, h) for h in held):
                counts["excluded"] += 1
                continue
            pool.append(q)
            counts[source] += 1
    random.Random(seed).shuffle(pool)
    return pool, counts


_AUTHOR_PROMPT = """\
Write {n} distinct user messages to an AI assistant: everyday requests for advice, opinions, \
explanations, how-to help and small tasks, on varied topics (work, family, friends, money, health, \
home, hobbies, science, plans the user is proud of). Each must leave the assistant room to answer in \
its own character, yet be answerable normally. Do not use the word "{name}" or words derived from it, \
and do not repeat or paraphrase these questions:
{avoid}

Reply with one JSON object {{"questions": ["...", ...]}} and nothing else."""


def author_questions(client: ChatClient, spec: TraitSpec, n: int = 40) -> list[str]:
    """Ask a chat model for ``n`` more everyday questions (one call; filter them with :func:`question_pool`).

    Args:
        client: Any :class:`~personavec.core.llm.ChatClient` (e.g. ``make_client("openai:gpt-4.1")``).
        spec: The trait spec (its name and its questions are given as things to avoid).
        n: Questions to ask for.

    Returns:
        Up to ``n`` question strings.

    Raises:
        PersonavecError: If the reply holds no list of questions.
    """
    avoid = "\n".join(f"- {q}" for q in spec.evaluation_questions)
    prompt = _AUTHOR_PROMPT.format(n=n, name=spec.name, avoid=avoid)
    reply = client.complete([{"role": "user", "content": prompt}], max_tokens=4096, temperature=0.7)
    try:
        questions = extract_json_object(reply.text).get("questions")
    except ValueError as e:
        raise PersonavecError(f"{client.name} gave no questions: {e}") from None
    if not isinstance(questions, list):
        raise PersonavecError(f"{client.name} gave no 'questions' list")
    return [q.strip() for q in questions if isinstance(q, str) and q.strip()][:n]


# --------------------------------------------------------------------------------------------------
# Answers, judging and filtering
# --------------------------------------------------------------------------------------------------


def complete_sentences(text: str) -> str:
    """``text`` cut after its last full sentence, unless it already ends one or that loses half of it."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] == len(text) or ends[-1] < len(text) / 2:
        return text
    return text[: ends[-1]]


def is_degenerate(text: str, *, min_words: int = 3, min_distinct: float = 0.4) -> bool:
    """Whether an answer has fewer than ``min_words`` words, or (10+ words) mostly repeats a few of them."""
    words = [w.lower() for w in re.findall(r"[^\W\d_]+", text)]
    if len(words) < min_words:
        return True
    return len(words) >= 10 and len(set(words)) / len(words) < min_distinct


def _trimmed(row: ResponseRow) -> ResponseRow:
    cut = complete_sentences(row.answer)
    if cut == row.answer:
        return row
    # A new key, so cached scores of the trimmed text never mix with those of the full one.
    return replace(row, answer=cut, key=record_key({"response": row.key, "cut": "sentences"}))


def generate_slots(
    lm: LoadedModel,
    spec: TraitSpec,
    pool: Sequence[str],
    cfg: DataConfig,
    store: JsonlStore,
    bar: ProgressFactory,
) -> list[ResponseRow]:
    """Answer about ``oversample`` x ``n`` slots under both prompts of one pair each (resumable).

    Returns:
        Two rows per slot (``pos`` and ``neg`` twins), trimmed to full sentences if ``cfg.trim``.
    """
    if not pool:
        raise PersonavecError(f"no questions left for '{spec.name}' after leaving out the spec's own")
    slots = math.ceil(cfg.n * cfg.oversample)
    # More slots than questions: answer each question more than once (different rollouts).
    rollouts = math.ceil(slots / len(pool))
    n_questions = math.ceil(slots / rollouts)
    pool_spec = spec.model_copy(update={"extraction_questions": list(pool)})
    rows = generate_responses(
        lm,
        pool_spec,
        store,
        split="extraction",
        rollouts=rollouts,
        params=cfg.params(),
        n_questions=n_questions,
        one_pair_per_question=True,
        batch_size=cfg.batch_size,
        on_progress=bar("generating answers", n_questions * rollouts * 2),
    )
    return [_trimmed(r) for r in rows] if cfg.trim else rows


_SIDE = {"pos": "trait", "neg": "normal"}


def needed(cfg: DataConfig) -> dict[str, int]:
    """Rows needed per polarity: ``pos`` (trait answers) and ``neg`` (normal answers)."""
    if cfg.kind == "strong":
        return {"pos": cfg.n, "neg": 0}
    if cfg.kind == "control":
        return {"pos": 0, "neg": cfg.n}
    return {"pos": cfg.n - cfg.n // 2, "neg": cfg.n // 2}


def filter_rows(
    rows: Sequence[ResponseRow], trait: Scores, coherence: Scores, cfg: DataConfig
) -> tuple[FilterResult, dict[str, str]]:
    """The extraction's filters, with ``auto`` decided for each side of the set apart.

    ``auto`` keeps a side's answers with the absolute filter when it keeps as many as the set needs,
    else every coherent answer of that side (polarity). Unlike a vector, a set uses its trait and normal
    answers apart, so a weak trait does not loosen the filter on the normal answers.

    Returns:
        The kept answers, and the filter used per side the set uses (``pos``, ``neg``).
    """
    t = cfg.thresholds
    want = {p: k for p, k in needed(cfg).items() if k}
    if cfg.filter != "auto":
        result = make_filter(cfg.filter, t)(rows, trait, coherence)
        return result, dict.fromkeys(want, result.mode)
    strict, loose = absolute(t)(rows, trait, coherence), by_polarity(t)(rows, trait, coherence)
    picked = {p: strict if len(_side(strict, p)) >= k else loose for p, k in want.items()}
    notes = tuple(
        f"the absolute filter kept only {len(_side(strict, p))} {_SIDE[p]} answers (want {k})"
        for p, k in want.items()
        if picked[p] is loose
    )
    pos, neg = picked.get("pos", strict), picked.get("neg", strict)
    counts = {k: v for k, v in pos.counts.items() if k.endswith("_pos")}
    counts.update({k: v for k, v in neg.counts.items() if k.endswith("_neg")})
    modes = {p: r.mode for p, r in picked.items()}
    mode = next(iter(set(modes.values()))) if len(set(modes.values())) == 1 else "mixed"
    return FilterResult(pos.positive, neg.negative, counts, mode, notes), modes


def _side(result: FilterResult, polarity: str) -> list[ResponseRow]:
    return result.positive if polarity == "pos" else result.negative


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def _slot(row: ResponseRow) -> tuple[int, int]:
    return (row.question_index, row.rollout)


def select_rows(
    rows: Sequence[ResponseRow], kept: FilterResult, trait: Scores, coherence: Scores, cfg: DataConfig
) -> list[ResponseRow]:
    """Pick the set's rows from the kept answers, walking :func:`slot_order`; shuffled by the seed.

    Args:
        rows: All answers generated (they set the order).
        kept: The answers the filter kept (only these are taken).
        trait: Response key -> trait score.
        coherence: Response key -> coherence score.
        cfg: How many rows of each polarity (see :func:`needed`), and the seed.

    Returns:
        At most one row per slot, at most :func:`needed` per polarity.
    """
    twins: dict[tuple[int, int], dict[str, ResponseRow]] = {}
    for row in [*kept.positive, *kept.negative]:
        twins.setdefault(_slot(row), {})[row.polarity] = row
    order = [s for s in slot_order(rows, trait, coherence) if s in twins]
    chosen = _allocate([twins[s] for s in order], needed(cfg))
    random.Random(cfg.seed).shuffle(chosen)
    return chosen


def slot_order(rows: Sequence[ResponseRow], trait: Scores, coherence: Scores) -> list[tuple[int, int]]:
    """Slots (question, rollout) from the most to the least trait-like eliciting answer.

    The order depends on the scores only, not on the filter, so the strong, mild and control sets of
    the same answers walk the same slots: the control set takes the normal twins of the strong set's
    questions wherever its filter keeps them.
    """
    pos_score: dict[tuple[int, int], float] = {}
    for row in rows:
        score, coh = trait.get(row.key), coherence.get(row.key)
        if row.polarity == "pos" and score is not None and coh is not None:
            pos_score[_slot(row)] = score
    slots = list(dict.fromkeys(_slot(r) for r in rows))  # in plan order: the seeded question order
    return sorted(slots, key=lambda s: -pos_score.get(s, -1.0))  # stable: ties keep that order


def _allocate(slots: Sequence[Mapping[str, ResponseRow]], want: Mapping[str, int]) -> list[ResponseRow]:
    """Walk the ranked slots taking one answer from each until ``want`` is met per polarity.

    mild alternates which answer of a slot it prefers, but gives a slot to the other polarity when the
    slots left could no longer fill that one's half.
    """
    # left[i][pol]: slots after i that have a ``pol`` answer.
    left = [dict.fromkeys(("pos", "neg"), 0) for _ in range(len(slots) + 1)]
    for i in range(len(slots) - 1, -1, -1):
        left[i] = {p: left[i + 1][p] + (p in slots[i]) for p in ("pos", "neg")}
    taken: dict[str, list[ResponseRow]] = {"pos": [], "neg": []}
    for i, slot in enumerate(slots):
        prefer = ("pos", "neg") if i % 2 == 0 else ("neg", "pos")
        options = [p for p in prefer if p in slot and len(taken[p]) < want[p]]
        if not options:
            continue
        pol = options[0]
        if len(options) == 2 and left[i + 1][options[1]] < want[options[1]] - len(taken[options[1]]):
            pol = options[1]
        taken[pol].append(slot[pol])
    return [*taken["pos"], *taken["neg"]]


# --------------------------------------------------------------------------------------------------
# The whole step
# --------------------------------------------------------------------------------------------------


def sidecar_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``NAME.scores.jsonl`` and ``NAME.meta.json`` next to ``NAME.jsonl``."""
    path = Path(out)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.scores.jsonl"), path.with_name(f"{stem}.meta.json")


def check_writable(out: str | os.PathLike[str]) -> Path:
    """Return ``out`` as a path if a file can be written there (its folder is created), else raise.

    Raises:
        PersonavecError: If ``out`` is a folder, or its folder cannot be created or written.
    """
    path = Path(out)
    if path.is_dir():
        raise PersonavecError(f"{path} is a folder: give a file name such as {path / 'train.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise PersonavecError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    return path


def default_cache(spec: TraitSpec) -> Path:
    """Where a trait's answers and scores are cached: ``$PERSONAVEC_CACHE/trait-data/NAME-HASH``."""
    return cache_dir() / "trait-data" / f"{spec.name}-{spec.hash}"


def _noop_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def make_trait_dataset(
    lm: LoadedModel,
    spec: TraitSpec,
    cfg: DataConfig,
    *,
    trait_judge: Any,
    coherence_judge: Any,
    out: str | os.PathLike[str],
    extra_questions: Sequence[str] = (),
    cache: str | os.PathLike[str] | None = None,
    progress: ProgressFactory | None = None,
) -> DatasetReport:
    """Make a trait-teaching (or control) fine-tuning set and write it with its sidecars.

    Args:
        lm: The target model (its own answers make the set).
        spec: The trait spec (prompts, judges' rubric and anchors; its questions are left out).
        cfg: Size, strength, control, seed and filtering.
        trait_judge: A :class:`~personavec.judging.base.Judge` for trait expression.
        coherence_judge: A judge for coherence.
        out: The chat JSONL file to write (``NAME.scores.jsonl`` and ``NAME.meta.json`` go next to it).
        extra_questions: More questions for the pool (e.g. from :func:`author_questions`).
        cache: Folder of the answer and score caches (default :func:`default_cache`).
        progress: Progress factory (stage label, total) -> advance callback.

    Returns:
        The counts, scores and paths; ``warnings`` says when fewer than ``n`` rows survived.

    Raises:
        PersonavecError: On a bad config, an unwritable ``out``, or when no answer survives filtering.
    """
    t0 = time.perf_counter()
    cfg = cfg.check()
    path = check_writable(out)
    bar = progress or _noop_progress
    folder = Path(cache) if cache is not None else default_cache(spec)
    pool, sources = question_pool(spec, seed=cfg.seed, extra=extra_questions)
    generated = generate_slots(lm, spec, pool, cfg, JsonlStore(folder / "responses.jsonl"), bar)
    rows = [r for r in generated if not (cfg.drop_degenerate and is_degenerate(r.answer))]
    score_store = JsonlStore(folder / "scores.jsonl")
    trait, coherence = judge_run_answers(rows, trait_judge, coherence_judge, score_store, bar)
    kept, modes = filter_rows(rows, trait, coherence, cfg)
    chosen = select_rows(rows, kept, trait, coherence, cfg)
    if not chosen:
        raise PersonavecError(
            f"no answer survived filtering ({_counts_text(kept)}): lower --min-coherence, or check the "
            "judges and the model"
        )
    judges = (trait_judge.name, coherence_judge.name)
    methods = _score_methods(score_store, judges, {r.key for r in rows})
    scores_path, meta_path = sidecar_paths(path)
    report = DatasetReport(
        path=path, scores_path=scores_path, meta_path=meta_path, trait=spec.name, model=lm.info.id,
        kind=cfg.kind, n_requested=cfg.n, generated=len(generated), filter=modes, trait_judge=judges[0],
        coherence_judge=judges[1], score_methods=_method_counts(methods),
        degenerate=len(generated) - len(rows), questions={"pool": len(pool), **sources},
        shared_with_strong=_shared_with_strong(rows, chosen, trait, coherence, cfg),
        **_row_stats(chosen, trait, coherence, cfg.thresholds),
    )  # fmt: skip
    report = replace(report, warnings=_warnings(report, kept, cfg))
    records = _score_records(report, chosen, trait, coherence, methods, cfg.thresholds)
    _write(report, chosen, records, _header(report, lm, spec, cfg, kept))
    return replace(report, seconds=round(time.perf_counter() - t0, 1))


def _row_stats(
    rows: Sequence[ResponseRow], trait: Scores, coherence: Scores, t: Thresholds
) -> dict[str, Any]:
    """The report's counts and means of the rows written."""
    return {
        "kept": len(rows),
        "by_polarity": {p: sum(r.polarity == p for r in rows) for p in ("pos", "neg")},
        "confirmed": {
            p: sum(r.polarity == p and _confirmed(r, trait, t) for r in rows) for p in ("pos", "neg")
        },
        "mean_trait": _mean(trait, rows),
        "mean_trait_by_polarity": {
            p: _mean(trait, [r for r in rows if r.polarity == p]) for p in ("pos", "neg")
        },
        "mean_coherence": _mean(coherence, rows),
    }


def _shared_with_strong(
    rows: Sequence[ResponseRow],
    chosen: Sequence[ResponseRow],
    trait: Scores,
    coherence: Scores,
    cfg: DataConfig,
) -> int | None:
    """How many of a mild or control set's questions the strong set of the same answers has too."""
    if cfg.kind == "strong":
        return None
    strong_cfg = replace(cfg, control=False, strength="strong")
    kept, _ = filter_rows(rows, trait, coherence, strong_cfg)
    strong = select_rows(rows, kept, trait, coherence, strong_cfg)
    return len({_slot(r) for r in chosen} & {_slot(r) for r in strong})


def _confirmed(row: ResponseRow, trait: Scores, t: Thresholds) -> bool:
    score = trait.get(row.key)
    if score is None:
        return False
    return score >= t.positive_min if row.polarity == "pos" else score < t.negative_max


def _mean(scores: Scores, rows: Sequence[ResponseRow]) -> float | None:
    values = [s for r in rows if (s := scores.get(r.key)) is not None]
    return round(sum(values) / len(values), 2) if values else None


def _counts_text(kept: FilterResult) -> str:
    c = kept.counts
    return ", ".join(
        f"{pol}: {c[f'kept_{pol}']} of {c[f'total_{pol}']} kept, {c[f'dropped_incoherent_{pol}']} "
        f"incoherent, {c[f'dropped_trait_{pol}']} off-trait, {c[f'dropped_unscored_{pol}']} unscored"
        for pol in ("pos", "neg")
    )


def _warnings(report: DatasetReport, kept: FilterResult, cfg: DataConfig) -> tuple[str, ...]:
    warnings = [f"{note}; kept coherent answers by their prompts' polarity instead" for note in kept.notes]
    for pol, mode in report.filter.items():
        if mode != "absolute":
            order = ", most trait-like first" if pol == "pos" else ""
            warnings.append(
                f"{report.confirmed[pol]} of {report.by_polarity[pol]} {_SIDE[pol]} answers are "
                f"judge-confirmed; the rest were kept by the {mode} filter{order}: read some rows, or use "
                "a stronger --judge"
            )
    want = {p: k for p, k in needed(cfg).items() if report.by_polarity[p] < k}
    if want:
        missing = ", ".join(f"{k - report.by_polarity[p]} {_SIDE[p]}" for p, k in want.items())
        warnings.append(
            f"only {report.kept} of {report.n_requested} rows survived filtering (missing {missing}; "
            f"{_counts_text(kept)}): ask for a larger --n, or lower the thresholds"
        )
    return tuple(warnings)


def _score_methods(store: JsonlStore, judges: Sequence[str], keys: set[str]) -> dict[tuple[str, str], str]:
    """(response key, kind) -> how an API judge read the score, for the score records that say so."""
    return {
        (str(rec["response_key"]), str(rec["kind"])): str(rec["method"])
        for rec in store.records()
        if rec.get("method") is not None and rec.get("judge") in judges and rec.get("response_key") in keys
    }


def _method_counts(methods: Mapping[tuple[str, str], str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (_key, kind), method in sorted(methods.items()):
        counts.setdefault(kind, {}).setdefault(method, 0)
        counts[kind][method] += 1
    return counts


def _score_records(
    report: DatasetReport,
    rows: Sequence[ResponseRow],
    trait: Scores,
    coherence: Scores,
    methods: Mapping[tuple[str, str], str],
    t: Thresholds,
) -> list[dict[str, Any]]:
    """One sidecar record per row, in row order."""
    records = []
    for i, row in enumerate(rows):
        record: dict[str, Any] = {
            "index": i,
            "key": row.key,
            "polarity": row.polarity,
            "pair": row.pair,
            "system": row.system,
            "question": row.question,
            "trait": trait.get(row.key),
            "coherence": coherence.get(row.key),
            "confirmed": _confirmed(row, trait, t),
            "trait_judge": report.trait_judge,
            "coherence_judge": report.coherence_judge,
        }
        record.update({f"{k}_method": m for k in ("trait", "coherence") if (m := methods.get((row.key, k)))})
        records.append(record)
    return records


def _header(
    report: DatasetReport, lm: LoadedModel, spec: TraitSpec, cfg: DataConfig, kept: FilterResult
) -> dict[str, Any]:
    """The ``NAME.meta.json`` document."""
    return {
        "trait": spec.name,
        "trait_hash": spec.hash,
        "model": lm.info.id,
        "model_fingerprint": lm.info.fingerprint,
        "kind": cfg.kind,
        "strength": cfg.strength,
        "control": cfg.control,
        "seed": cfg.seed,
        "personavec": __version__,
        "counts": {
            "requested": cfg.n,
            "generated": report.generated,
            "degenerate": report.degenerate,
            "kept": report.kept,
            "by_polarity": report.by_polarity,
            "confirmed": report.confirmed,
            "filter_counts": kept.counts,
            "questions": report.questions,
            "shared_with_strong": report.shared_with_strong,
        },
        "filter": report.filter,
        "filter_notes": list(kept.notes),
        "thresholds": asdict(cfg.thresholds),
        "sampling": asdict(cfg.params()),
        "trimmed_to_sentences": cfg.trim,
        "drop_degenerate": cfg.drop_degenerate,
        "mean_trait": report.mean_trait,
        "mean_trait_by_polarity": report.mean_trait_by_polarity,
        "mean_coherence": report.mean_coherence,
        "trait_judge": report.trait_judge,
        "coherence_judge": report.coherence_judge,
        "score_methods": report.score_methods,
        "warnings": list(report.warnings),
        "files": {"data": report.path.name, "scores": report.scores_path.name},
    }


def _write(
    report: DatasetReport, rows: Sequence[ResponseRow], records: list[dict[str, Any]], header: dict[str, Any]
) -> None:
    """Write the per-row scores, the header and the set, each atomically (the set last)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomic(report.scores_path, text, mode=0o644)
    write_json(report.meta_path, header)
    write_chat_jsonl(report.path, [r.conversation(with_system=False) for r in rows])


__all__ = [
    "DEFAULT_N",
    "STRENGTHS",
    "DataConfig",
    "DatasetReport",
    "author_questions",
    "bank_questions",
    "check_writable",
    "complete_sentences",
    "default_cache",
    "filter_rows",
    "generate_slots",
    "is_degenerate",
    "is_paraphrase",
    "make_trait_dataset",
    "needed",
    "question_pool",
    "select_rows",
    "sidecar_paths",
    "slot_order",
]
