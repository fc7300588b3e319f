"""Offline capability probe: how much general ability a model keeps through fine-tuning.

Two cheap signals, both computed without a judge or a network:

* **Multiple choice**: a bundled set of hand-written general-knowledge questions (and, optionally, a local
  copy of MMLU), scored one of two ways. ``letter``: the question and lettered choices as a user turn,
  then ``Answer:`` after the generation prompt; the next-token logits of the letters (``" A"`` or
  ``"A"``, whichever scores higher) decide the pick. ``cloze``: the question alone, then ``Answer:``; each
  choice's text is scored by its mean token log-probability as the continuation. Letter scoring is the
  usual MMLU format but needs a model that follows it (SmolLM2-135M picks the same letter whatever the
  question: chance); cloze scoring works for small models too. Besides accuracy we report the mean
  probability of the correct choice among the offered ones, a smoother signal that moves before
  accuracy does.
* **Perplexity** on bundled neutral encyclopedic prose, token-level and padding-aware.

Everything runs under ``torch.inference_mode`` with the model in eval mode; each module's previous
training flag is restored afterwards, so a training loop can call the probe between steps.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from personavec.core.conversations import has_chat_template, render_prompt
from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel

PROBE_DATA = Path(__file__).parent / "probe_data"
QUESTIONS_FILE = PROBE_DATA / "general_knowledge.jsonl"
NEUTRAL_FILE = PROBE_DATA / "neutral.txt"
LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the letter only."
ANSWER_CUE = "Answer:"
McMethod = Literal["letter", "cloze"]
METHODS: tuple[str, ...] = get_args(McMethod)


@dataclass(frozen=True)
class McQuestion:
    """One multiple-choice question.

    Attributes:
        question: The question text.
        choices: The options, in order; option ``i`` is labelled ``LETTERS[i]``.
        answer: The correct letter (``"A"``, ``"B"``, ...).
        subject: Optional subject, used to group accuracy.
    """

    question: str
    choices: tuple[str, ...]
    answer: str
    subject: str = ""


@dataclass(frozen=True)
class McResult:
    """Multiple-choice scores.

    Attributes:
        accuracy: Fraction of questions whose highest-scoring choice is the correct one.
        n: Number of questions.
        mean_correct_prob: Mean probability of the correct choice among the offered ones (soft-maxed scores),
            a smoother signal than accuracy.
        per_subject: Accuracy per subject (questions without a subject are grouped under ``""``).
        method: How choices were scored, ``letter`` or ``cloze`` (see :func:`choice_probs`).
    """

    accuracy: float
    n: int
    mean_correct_prob: float
    per_subject: dict[str, float]
    method: str = "letter"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class CapabilityResult:
    """The capability probe's result.

    Attributes:
        mc: Scores on the bundled general-knowledge questions.
        perplexity: Perplexity on the bundled neutral text.
        mmlu: Scores on a local MMLU copy, when one was given.
    """

    mc: McResult
    perplexity: float
    mmlu: McResult | None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "mc": self.mc.to_dict(),
            "perplexity": self.perplexity,
            "mmlu": None if self.mmlu is None else self.mmlu.to_dict(),
        }


def _make_question(row: Any, where: str) -> McQuestion:
    """Validate one parsed row; ``where`` names the file and line for the error."""
    if not isinstance(row, dict):
        raise PersonavecError(f"{where}: expected a JSON object with question, choices and answer")
    q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise PersonavecError(f"{where}: 'question' must be a non-empty string")
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise PersonavecError(f"{where}: 'choices' must be a list of 2-{len(LETTERS)} non-empty strings")
    letters = LETTERS[: len(choices)]
    if not isinstance(answer, str) or answer not in letters:
        raise PersonavecError(f"{where}: 'answer' must be one of {', '.join(letters)}, not {answer!r}")
    subject = row.get("subject", "")
    if not isinstance(subject, str):
        raise PersonavecError(f"{where}: 'subject' must be a string")
    return McQuestion(q, tuple(choices), answer, subject)


def load_questions(path: Path | None = None) -> list[McQuestion]:
    """Read multiple-choice questions from a JSONL file.

    Each line is ``{"question": ..., "choices": [...], "answer": "B", "subject": ...}`` (``subject``
    optional); blank lines are skipped.

    Args:
        path: The file; defaults to the bundled general-knowledge set.

    Returns:
        The questions, in file order.

    Raises:
        PersonavecError: If the file is missing, empty, or a line is malformed (the message names the line).
    """
    path = QUESTIONS_FILE if path is None else Path(path)
    if not path.is_file():
        raise PersonavecError(f"question file not found: {path}")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PersonavecError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        out.append(_make_question(row, f"{path}:{i}"))
    if not out:
        raise PersonavecError(f"{path}: no questions")
    return out


def _mmlu_csv(files: Sequence[Path]) -> list[McQuestion]:
    out = []
    for f in files:
        subject = f.stem.removesuffix("_test")
        with f.open(newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.reader(fh), start=1):
                if len(row) != 6:
                    raise PersonavecError(f"{f}:{i}: expected 6 columns (question, A, B, C, D, answer)")
                rec = {"question": row[0], "choices": row[1:5], "answer": row[5].strip(), "subject": subject}
                out.append(_make_question(rec, f"{f}:{i}"))
    return out


def _mmlu_parquet(files: Sequence[Path]) -> list[McQuestion]:
    import pyarrow.parquet as pq

    out = []
    for f in files:
        for i, row in enumerate(pq.read_table(f).to_pylist()):
            answer = row.get("answer")
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(LETTERS):
                answer = LETTERS[answer]
            rec = {**row, "choices": list(row.get("choices") or []), "answer": answer}
            rec["subject"] = str(rec.get("subject") or "")
            out.append(_make_question(rec, f"{f}: row {i}"))
    return out


def _mmlu_files(path: Path, ext: str) -> list[Path]:
    """The test files under ``path`` (or ``path`` itself), preferring a ``test`` / ``all`` subfolder."""
    if path.is_file():
        return [path] if path.suffix == ext else []
    for sub in ("test", "all"):
        if (path / sub).is_dir() and any((path / sub).rglob(f"*{ext}")):
            path = path / sub
            break
    files = sorted(path.rglob(f"*{ext}"))
    tests = [f for f in files if "test" in f.name]
    return tests or files


def load_mmlu(path: Path) -> list[McQuestion]:
    """Read a local copy of MMLU.

    Two layouts are understood: the original CSV release (a folder of ``<subject>_test.csv`` files,
    possibly under ``test/``; rows ``question, A, B, C, D, answer-letter`` without a header), and the
    parquet release (a ``.parquet`` file or a folder of them, preferring ``all/``; columns
    ``question``, ``choices``, ``answer`` as an index or a letter, and optionally ``subject``).

    Args:
        path: A folder or a single ``.csv`` / ``.parquet`` file.

    Returns:
        The questions.

    Raises:
        PersonavecError: If nothing is found there or a row is malformed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PersonavecError(f"MMLU path not found: {path}")
    questions: list[McQuestion] = []
    if parquet := _mmlu_files(path, ".parquet"):
        questions = _mmlu_parquet(parquet)
    elif csvs := _mmlu_files(path, ".csv"):
        questions = _mmlu_csv(csvs)
    if not questions:
        raise PersonavecError(
            f"no MMLU questions in {path}: expected <subject>_test.csv files or .parquet files"
        )
    return questions


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; every module's training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _user_prompt(tokenizer: Any, content: str) -> str:
    """``content`` as a user turn, the generation prompt, then the ``Answer:`` cue."""
    prompt = render_prompt(tokenizer, [{"role": "user", "content": content}])
    return prompt + ("" if has_chat_template(tokenizer) else " ") + ANSWER_CUE


def format_question(tokenizer: Any, q: McQuestion, method: McMethod = "letter") -> str:
    """The prompt text for one question, ending right before the answer.

    Args:
        tokenizer: The model's tokenizer (its chat template is used when it has one).
        q: The question.
        method: ``letter``: the question, lettered choices and an instruction to answer with the letter;
            ``cloze``: the question alone (the choices are scored as continuations).

    Returns:
        The rendered prompt, ending with ``Answer:``.
    """
    if method == "cloze":
        return _user_prompt(tokenizer, q.question)
    options = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, q.choices))
    return _user_prompt(tokenizer, f"{q.question}\n{options}\n{INSTRUCTION}")


def letter_token_ids(tokenizer: Any, n: int) -> list[list[int]]:
    """For each of the first ``n`` letters, the ids of its single-token variants (``" A"``, ``"A"``).

    Raises:
        PersonavecError: If a letter has no single-token variant.
    """
    out = []
    for letter in LETTERS[:n]:
        ids = [tokenizer.encode(v, add_special_tokens=False) for v in (f" {letter}", letter)]
        single = sorted({i[0] for i in ids if len(i) == 1})
        if not single:
            raise PersonavecError(f"the tokenizer has no single token for the answer letter '{letter}'")
        out.append(single)
    return out


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _batched_logits(
    lm: LoadedModel, rows: Sequence[Sequence[int]], batch_size: int
) -> Iterator[tuple[Sequence[Sequence[int]], Tensor]]:
    """Yield each batch of rows with its float logits ``(batch, width, vocab)``, right-padded.

    Right padding keeps every real token at the position it has alone, and causal attention keeps it
    from seeing the padding after it; the mask is passed as well.
    """
    pad_id = int(lm.tokenizer.pad_token_id)
    for start in range(0, len(rows), max(1, batch_size)):
        batch = rows[start : start + max(1, batch_size)]
        ids, mask = _right_pad(batch, pad_id, lm.device)
        yield batch, lm.model(input_ids=ids, attention_mask=mask).logits.float()


def _letter_scores(lm: LoadedModel, questions: Sequence[McQuestion], batch_size: int) -> list[Tensor]:
    """Per question, the best next-token logit of each offered letter after the prompt."""
    tok = lm.tokenizer
    letters = letter_token_ids(tok, max(len(q.choices) for q in questions))
    rows = [tok(format_question(tok, q), add_special_tokens=False)["input_ids"] for q in questions]
    scores: list[Tensor] = []
    for batch, logits in _batched_logits(lm, rows, batch_size):
        for i, row in enumerate(batch):
            last = logits[i, len(row) - 1]
            n = len(questions[len(scores)].choices)
            scores.append(torch.stack([last[ids].max() for ids in letters[:n]]).cpu())
    return scores


def _cache_arg(model: nn.Module) -> str:
    """The forward keyword for a KV cache: ``cache`` in transformers 5, ``past_key_values`` before."""
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper's forward takes **kwargs
    base: Any = get_base() if callable(get_base) else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cloze_one(lm: LoadedModel, q: McQuestion) -> Tensor:
    """Mean log-probability of each choice's tokens after the question's prompt.

    The prompt runs once; its KV cache is repeated for the choices, which run together right-padded.
    """
    tok, arg = lm.tokenizer, _cache_arg(lm.model)
    prompt = tok(format_question(tok, q, "cloze"), add_special_tokens=False)["input_ids"]
    conts = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in q.choices]  # after "Answer:"
    out = lm.model(input_ids=torch.tensor([prompt], device=lm.device), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)  # predicts each choice's first token
    cache = out.get("cache") or out.get("past_key_values")
    cache.batch_repeat_interleave(len(conts))
    ids, mask = _right_pad(conts, int(tok.pad_token_id), lm.device)
    full_mask = torch.cat([mask.new_ones((len(conts), len(prompt))), mask], 1)
    logits = lm.model(input_ids=ids, attention_mask=full_mask, **{arg: cache}).logits
    logp = logits.float().log_softmax(-1)
    scores = []
    for i, c in enumerate(conts):
        rest = logp[i, : len(c) - 1].gather(-1, ids[i, 1 : len(c), None]).sum()
        scores.append((first[c[0]] + rest) / len(c))
    return torch.stack(scores).cpu()


def _cloze_scores(lm: LoadedModel, questions: Sequence[McQuestion], batch_size: int) -> list[Tensor]:
    """Per question, the mean log-probability of each choice's tokens (one question per pass)."""
    del batch_size  # the choices of one question form the batch
    return [_cloze_one(lm, q) for q in questions]


def choice_probs(
    lm: LoadedModel, questions: Sequence[McQuestion], *, method: McMethod = "letter", batch_size: int = 16
) -> list[Tensor]:
    """The model's probability for each offered choice, per question.

    ``letter``: the score of a choice is the best next-token logit of its letter over the letter's
    single-token variants (``" A"``, ``"A"``). ``cloze``: the mean log-probability of the choice text as
    the answer (length-normalised, so long options are not penalised for their length). Either way the
    scores of the offered choices are soft-maxed.

    Args:
        lm: The model.
        questions: The questions.
        method: ``letter`` or ``cloze``.
        batch_size: Questions per forward pass for ``letter``; ``cloze`` runs one question at a time
            (its prompt once, then its choices together on the prompt's KV cache).

    Returns:
        One CPU tensor of ``len(q.choices)`` probabilities per question.

    Raises:
        PersonavecError: On an unknown method.
    """
    if method not in METHODS:
        raise PersonavecError(f"unknown multiple-choice method '{method}' (use {', '.join(METHODS)})")
    if not questions:
        return []
    scorer = _letter_scores if method == "letter" else _cloze_scores
    with _eval_mode(lm.model):
        return [s.softmax(-1) for s in scorer(lm, questions, batch_size)]


def multiple_choice(
    lm: LoadedModel, questions: Sequence[McQuestion], *, batch_size: int = 16, method: McMethod = "letter"
) -> McResult:
    """Score the model on multiple-choice questions.

    Args:
        lm: The model (a peft-wrapped ``lm.model`` works too).
        questions: The questions (at least one).
        batch_size: Questions per forward pass (``letter``; see :func:`choice_probs`).
        method: ``letter`` (answer-letter likelihood, the usual MMLU format; needs a model that follows
            the format, which SmolLM2-135M does not) or ``cloze`` (likelihood of each choice's text,
            informative for small models too). See :func:`choice_probs`.

    Returns:
        Accuracy, mean probability of the correct choice, and accuracy per subject.

    Raises:
        PersonavecError: If there are no questions or the method is unknown.
    """
    if not questions:
        raise PersonavecError("multiple_choice needs at least one question")
    probs = choice_probs(lm, questions, method=method, batch_size=batch_size)
    by_subject: dict[str, list[bool]] = defaultdict(list)
    correct_p = []
    for q, p in zip(questions, probs):
        k = LETTERS.index(q.answer)
        by_subject[q.subject].append(int(p.argmax()) == k)
        correct_p.append(float(p[k]))
    hits = [h for hs in by_subject.values() for h in hs]
    return McResult(
        accuracy=sum(hits) / len(hits),
        n=len(hits),
        mean_correct_prob=sum(correct_p) / len(correct_p),
        per_subject={s: sum(hs) / len(hs) for s, hs in sorted(by_subject.items())},
        method=method,
    )


def neutral_texts() -> list[str]:
    """The bundled neutral paragraphs (plain encyclopedic prose, no persona), one string each."""
    text = NEUTRAL_FILE.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def perplexity(
    lm: LoadedModel, texts: Sequence[str] | None = None, *, batch_size: int = 8, max_tokens: int = 256
) -> float:
    """Token-level perplexity: ``exp`` of the mean negative log-likelihood over every predicted token.

    Each text is tokenised the way the tokenizer does by default (with its BOS if it adds one) and
    truncated to ``max_tokens`` tokens; every token after the first is predicted, padding never counts.

    Args:
        lm: The model.
        texts: The texts; defaults to :func:`neutral_texts`.
        batch_size: Texts per forward pass.
        max_tokens: Longest tokenised text kept.

    Returns:
        The perplexity.

    Raises:
        PersonavecError: If no text has at least two tokens.
    """
    texts = neutral_texts() if texts is None else list(texts)
    rows = [r for r in (lm.tokenizer(t)["input_ids"][:max_tokens] for t in texts) if len(r) >= 2]
    if not rows:
        raise PersonavecError("perplexity needs at least one text of two or more tokens")
    total = 0.0
    with _eval_mode(lm.model):
        for batch, logits in _batched_logits(lm, rows, batch_size):
            for i, row in enumerate(batch):
                target = torch.tensor(row[1:], device=logits.device)
                nll = torch.nn.functional.cross_entropy(logits[i, : len(row) - 1], target, reduction="sum")
                total += float(nll)
    return math.exp(total / sum(len(r) - 1 for r in rows))


def capability_probe(
    lm: LoadedModel,
    *,
    mmlu_path: Path | None = None,
    mmlu_limit: int | None = 500,
    method: McMethod = "cloze",
    batch_size: int = 16,
) -> CapabilityResult:
    """Run the whole probe: bundled multiple choice, neutral-text perplexity and optionally MMLU.

    Args:
        lm: The model.
        mmlu_path: A local MMLU copy (see :func:`load_mmlu`); skipped when ``None``.
        mmlu_limit: At most this many MMLU questions, a fixed random sample across subjects
            (``None``: all of them).
        method: How choices are scored (see :func:`multiple_choice`). The default, ``cloze``, is the one
            that tells something about small models: SmolLM2-135M answers letter prompts at chance.
        batch_size: Questions (``letter``) or texts (perplexity) per forward pass.

    Returns:
        The scores.
    """
    mc = multiple_choice(lm, load_questions(), method=method, batch_size=batch_size)
    ppl = perplexity(lm, batch_size=batch_size)
    mmlu = None
    if mmlu_path is not None:
        questions = load_mmlu(mmlu_path)
        if mmlu_limit is not None and len(questions) > mmlu_limit:
            keep = sorted(random.Random(0).sample(range(len(questions)), mmlu_limit))
            questions = [questions[i] for i in keep]
        mmlu = multiple_choice(lm, questions, method=method, batch_size=batch_size)
    return CapabilityResult(mc, ppl, mmlu)
