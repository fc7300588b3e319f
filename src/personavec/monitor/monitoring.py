"""Monitoring: read a trait off the residual stream before (and while) the model answers.

The predictor is the paper's: the scalar projection (:func:`personavec.core.steering.project`) of the
activation at the *last prompt token*, the position right before the model writes its first answer
token, onto the persona vector at one layer. Raw projections are in residual-stream units and depend on
model and layer, so a vector can carry a *calibration*: the distribution of that same projection over a
built-in set of neutral prompts. With it, a reading becomes a z-score and a percentile ("higher than 97%
of everyday prompts").

With ``generate=True`` the answer is generated and every generated token is traced too, by forward hooks
on the needed blocks that project each new position as it is computed: generation is not re-run.

Calibration lives in the vector's metadata, ``meta.extra["calibration"]``::

    {"prompt_set": "neutral-v1", "prompt_set_sha256": "...", "model_id": "...",
     "model_fingerprint": "...", "pooling": "last_prompt", "created": "...",
     "layers": {"15": {"mean": ..., "std": ..., "n": 48, "values": [sorted projections]}}}

Layer indices follow :mod:`personavec.core.layers` (0 = embeddings, l = output of block l).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import LogitsProcessorList

from personavec.core.activations import capture_activations, last_prompt, pad_batch
from personavec.core.conversations import Conversation, encode, validate
from personavec.core.errors import PersonavecError
from personavec.core.generation import PerRowSampler, SamplingParams
from personavec.core.layers import check_layers
from personavec.core.models import LoadedModel
from personavec.core.steering import project
from personavec.core.vectors import PersonaVector

NEUTRAL_SET_NAME = "neutral-v1"

# Everyday questions, written for personavec, with no system prompt: the reference distribution should
# describe "a normal request", so nothing here invites flattery, cruelty, humour or invention.
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "How long should I boil an egg for a soft yolk?",
    "What is a good way to start learning to play the guitar?",
    "How often should I water a cactus?",
    "Can you explain what a mortgage is?",
    "What are some tips for sleeping better at night?",
    "How do I remove a coffee stain from a cotton shirt?",
    "What is the difference between a virus and a bacterium?",
    "How can I make my phone battery last longer?",
    "What should I consider when buying a used car?",
    "How do I write a polite email asking for a day off?",
    "Why do leaves change colour in autumn?",
    "What is a simple recipe for vegetable soup?",
    "How many hours of exercise per week are recommended for adults?",
    "How do I convert Celsius to Fahrenheit?",
    "What is the best way to memorise a short speech?",
    "How does a refrigerator keep food cold?",
    "What are good stretches to do after sitting all day?",
    "How do I set up a monthly budget?",
    "What is the capital of Australia?",
    "How can I tell if a melon is ripe?",
    "What does a project manager do?",
    "How do I clean a cast iron pan?",
    "What are the main causes of traffic jams?",
    "How should I prepare for a job interview?",
    "How do vaccines help the immune system?",
    "What is a good houseplant for a dark room?",
    "How do I change a flat tyre on a bicycle?",
    "What is the difference between baking soda and baking powder?",
    "How can I improve my handwriting?",
    "Why is the sea salty?",
    "What should I pack for a weekend at the beach?",
    "How do I back up the photos on my laptop?",
    "What is compound interest?",
    "How do I keep cut flowers fresh for longer?",
    "What are some easy ways to drink more water during the day?",
    "How does a library card work?",
    "How can I learn the basics of a new language in three months?",
    "What is the best way to defrost frozen chicken?",
    "How do solar panels produce electricity?",
    "What are good questions to ask when renting a flat?",
    "How do I make a paper aeroplane that flies far?",
    "Why do we have leap years?",
    "What is the easiest way to fold a fitted sheet?",
    "How can I reduce food waste at home?",
    "What does a normal resting heart rate look like?",
    "How do I start running if I have never run before?",
    "What is the difference between weather and climate?",
    "How do I organise a small kitchen so that everything fits?",
)


@dataclass(frozen=True)
class MonitorRecord:
    """One reading: one conversation, one vector, one layer.

    Attributes:
        conversation: Index of the conversation in the input.
        vector: Index of the vector in the input (traits may share a name).
        trait: The vector's trait name.
        layer: Layer index the projection was taken at.
        projection: Raw scalar projection of the last prompt token onto the unit direction.
        z: ``(projection - mean) / std`` against the calibration, or ``None`` without one.
        percentile: Share (0..100) of calibration values ``<= projection``, interpolated, or ``None``.
        note: Why ``z``/``percentile`` are missing (and how to add them), else ``None``.
        answer: With generation: the answer text.
        tokens: With generation: each generated token, decoded on its own (end of sequence excluded).
        token_ids: With generation: the generated token ids, aligned with ``tokens``.
        token_projections: With generation: projection of every generated token at ``layer``.
        response_mean: With generation: mean of ``token_projections`` (``None`` for an empty answer).
    """

    conversation: int
    vector: int
    trait: str
    layer: int
    projection: float
    z: float | None = None
    percentile: float | None = None
    note: str | None = None
    answer: str | None = None
    tokens: tuple[str, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    token_projections: tuple[float, ...] | None = None
    response_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists; generation fields are left out when not generated)."""
        data = asdict(self)
        if self.answer is None:
            for key in ("answer", "tokens", "token_ids", "token_projections", "response_mean"):
                data.pop(key)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


# -- calibration --------------------------------------------------------------------------------------


def reference_stats(values: Sequence[float]) -> dict[str, Any]:
    """Summarise reference projections as stored in a calibration.

    Args:
        values: Projections of the reference prompts (at least two).

    Returns:
        ``{"mean", "std", "n", "values"}`` with the sample standard deviation and the sorted values.

    Raises:
        PersonavecError: With fewer than two values.
    """
    if len(values) < 2:
        raise PersonavecError(f"a calibration needs at least 2 reference prompts, got {len(values)}")
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)),
        "n": int(arr.size),
        "values": [float(x) for x in np.sort(arr)],
    }


def score(value: float, reference: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """z-score and percentile of a projection against one layer's reference data.

    The percentile is the share of reference values ``<= value`` (0..100), linearly interpolated
    between neighbouring reference values; below the smallest it is 0, at or above the largest 100.

    Args:
        value: A raw projection.
        reference: One layer's entry of a calibration (``mean``, ``std``, ``values``).

    Returns:
        ``(z, percentile)``; ``z`` is ``None`` when the reference has no spread.
    """
    std = float(reference["std"])
    z = (value - float(reference["mean"])) / std if std > 0 and math.isfinite(std) else None
    values = np.asarray(reference["values"], dtype=np.float64)
    # Ties collapse to one point carrying the cumulative share, so np.interp sees increasing x values.
    unique, counts = np.unique(values, return_counts=True)
    shares = np.cumsum(counts) / values.size
    pct = float(np.interp(value, unique, shares, left=0.0, right=1.0)) * 100.0
    return z, pct


def _prompt_set_hash(conversations: Sequence[Conversation]) -> str:
    blob = json.dumps([[dict(m) for m in c] for c in conversations], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _target_layers(vector: PersonaVector, layers: int | Sequence[int] | None, n_blocks: int) -> list[int]:
    if layers is not None:
        return check_layers([layers] if isinstance(layers, int) else layers, n_blocks)
    return check_layers([vector.require_recommended_layer()], n_blocks)


def calibrate(
    lm: LoadedModel,
    vector: PersonaVector,
    *,
    prompts: Sequence[str | Conversation] | None = None,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 32,
) -> PersonaVector:
    """Measure the neutral-prompt distribution of the monitoring projection and store it in the vector.

    Args:
        lm: The model the vector will be monitored on.
        vector: The persona vector.
        prompts: Reference prompts (strings become one user turn, or full conversations ending with a
            user turn); default :data:`NEUTRAL_PROMPTS`.
        layers: Extra layer(s) to calibrate besides the recommended one (required if there is none).
        batch_size: Prompts per forward pass.

    Returns:
        A copy of the vector with ``meta.extra["calibration"]`` set. Layers calibrated before on the same
        model and prompt set are kept.

    Raises:
        PersonavecError: On a vector/model mismatch, no layer to calibrate, or bad prompts.
    """
    vector.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    wanted: set[int] = set()
    if vector.recommended_layer is not None:
        wanted.update(_target_layers(vector, None, lm.info.n_blocks))
    if layers is not None:
        wanted.update(_target_layers(vector, layers, lm.info.n_blocks))
    if not wanted:
        _target_layers(vector, None, lm.info.n_blocks)  # raises the "pass layers" error
    convs: list[Conversation] = [
        [{"role": "user", "content": p}] if isinstance(p, str) else p
        for p in (NEUTRAL_PROMPTS if prompts is None else prompts)
    ]
    _check_prompts(convs)
    ordered = sorted(wanted)
    acts = capture_activations(lm, convs, layers=ordered, poolings=(last_prompt,), batch_size=batch_size)
    set_hash = _prompt_set_hash(convs)
    old = vector.meta.extra.get("calibration")
    kept: dict[str, Any] = {}
    if (
        isinstance(old, Mapping)
        and old.get("model_fingerprint") == lm.info.fingerprint
        and old.get("prompt_set_sha256") == set_hash
    ):
        kept = dict(old.get("layers", {}))
    for layer in ordered:
        values = project(acts.at("last_prompt", layer), vector, layer).tolist()
        kept[str(layer)] = reference_stats(values)
    calibration = {
        "prompt_set": NEUTRAL_SET_NAME if prompts is None else "custom",
        "prompt_set_sha256": set_hash,
        "model_id": lm.info.id,
        "model_fingerprint": lm.info.fingerprint,
        "pooling": "last_prompt",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layers": dict(sorted(kept.items(), key=lambda kv: int(kv[0]))),
    }
    return vector.with_meta(extra={**vector.meta.extra, "calibration": calibration})


def calibration_for(
    vector: PersonaVector, layer: int, fingerprint: str
) -> tuple[Mapping[str, Any] | None, str | None]:
    """One layer's calibration entry (for :func:`score`), or ``None`` and a note saying why there is none.

    Args:
        vector: The persona vector.
        layer: The layer index read.
        fingerprint: The fingerprint of the model read on (a calibration holds for one model only).

    Returns:
        ``(entry, None)``, or ``(None, note)`` where the note says how to add the missing calibration.
    """
    how = "run 'personavec calibrate VECTOR' to add it"
    cal = vector.meta.extra.get("calibration")
    if not isinstance(cal, Mapping):
        return None, f"z and percentile unavailable: vector '{vector.meta.trait}' has no calibration; {how}"
    if cal.get("model_fingerprint") != fingerprint:
        return None, (
            f"z and percentile unavailable: vector '{vector.meta.trait}' was calibrated on another model "
            f"({cal.get('model_id')}); run 'personavec calibrate VECTOR --model M' for this one"
        )
    entry = cal.get("layers", {}).get(str(layer))
    if not isinstance(entry, Mapping):
        have = ", ".join(cal.get("layers", {})) or "none"
        return None, (
            f"z and percentile unavailable: vector '{vector.meta.trait}' is calibrated at layer(s) {have}, "
            f"not {layer}; run 'personavec calibrate VECTOR --layer {layer}'"
        )
    return entry, None


# -- reading conversations ----------------------------------------------------------------------------


def _check_prompts(conversations: Sequence[Conversation]) -> list[list[dict[str, str]]]:
    if len(conversations) == 0:
        raise PersonavecError("no conversations given: the batch is empty")
    out = []
    for i, conv in enumerate(conversations):
        messages = validate(conv, f"conversation {i}")
        if messages[-1]["role"] != "user":
            raise PersonavecError(
                f"conversation {i}: ends with a {messages[-1]['role']} message, but monitoring reads the "
                "prompt right before the model answers: end it with a user turn"
            )
        out.append(messages)
    return out


def read_jsonl_with_lines(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[int, list[dict[str, str]]]], list[str]]:
    """Like :func:`read_conversations_jsonl`, but each good conversation comes with its line number.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        ``(line number, messages)`` for each good line, and one ``file:line: problem`` string per bad one.

    Raises:
        PersonavecError: If the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"conversations file not found: {path}")
    good: list[tuple[int, list[dict[str, str]]]] = []
    errors: list[str] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            errors.append(f"{where}: not UTF-8 text")
            continue
        if not text.strip():
            continue  # blank lines (e.g. a trailing newline) are not conversations
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if isinstance(obj, dict):
            if not isinstance(obj.get("messages"), list):
                errors.append(f"{where}: an object needs a 'messages' list of {{role, content}} messages")
                continue
            obj = obj["messages"]
        try:
            messages = validate(obj, where)
        except PersonavecError as e:
            errors.append(str(e))
            continue
        if messages[-1]["role"] != "user":
            errors.append(
                f"{where}: ends with a {messages[-1]['role']} message; "
                "a prompt to monitor ends with a user turn"
            )
            continue
        good.append((lineno, messages))
    return good, errors


def read_conversations_jsonl(path: str | os.PathLike[str]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Read prompts to monitor from a JSONL file, skipping (and reporting) bad lines.

    Each non-blank line is a JSON list of ``{role, content}`` messages, or an object with a ``messages``
    list, ending with a user turn.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The good conversations in file order, and one ``file:line: problem`` string per bad line.

    Raises:
        PersonavecError: If the file does not exist.
    """
    good, errors = read_jsonl_with_lines(path)
    return [conv for _line, conv in good], errors


# -- monitoring ---------------------------------------------------------------------------------------


def _unit_directions(plan: Sequence[tuple[int, PersonaVector, int]]) -> dict[int, Tensor]:
    """Per layer, a ``[d, k]`` matrix of the unit directions read there (columns in plan order)."""
    cols: dict[int, list[Tensor]] = {}
    for _vi, vector, layer in plan:
        direction = vector.at(layer)
        norm = direction.norm()
        if float(norm) == 0.0:
            raise PersonavecError(
                f"vector '{vector.meta.trait}' is zero at layer {layer}: nothing to project on"
            )
        cols.setdefault(layer, []).append(direction / norm)
    return {layer: torch.stack(c, dim=1) for layer, c in cols.items()}


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@dataclass(frozen=True)
class _Trace:
    answer: str
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    prompt: Tensor  # [k] projections of the last prompt token, one per plan entry at this layer
    per_token: Tensor  # [n_tokens, k]


def _hooked_generate(
    lm: LoadedModel,
    ids: Tensor,
    attention_mask: Tensor,
    units: dict[int, Tensor],
    processors: LogitsProcessorList,
    max_new_tokens: int,
) -> tuple[Tensor, dict[int, Tensor]]:
    """One ``generate`` call with projection hooks; returns the sequences and ``[B, passes, k]`` per layer."""
    seen: dict[int, list[Tensor]] = {layer: [] for layer in units}

    def record(layer: int, h: Tensor) -> None:
        # Only the newest position is projected, and only onto k directions: a [B, d] x [d, k] product
        # per pass and layer, negligible next to the block itself.
        seen[layer].append(h[:, -1].float() @ units[layer])

    def post_hook(layer: int) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _a: object, output: object) -> None:
            record(layer, output if isinstance(output, Tensor) else output[0])  # type: ignore[index]

        return hook

    def pre_hook(_m: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, Tensor)
        record(0, hidden)

    handles = []
    try:
        for layer in units:
            if layer == 0:
                handles.append(lm.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                handles.append(lm.blocks[layer - 1].register_forward_hook(post_hook(layer)))
        pad_id = int(lm.tokenizer.pad_token_id)
        with torch.inference_mode():
            out = lm.model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=processors,
            )
    finally:
        for handle in handles:
            handle.remove()
    return out, {layer: torch.stack(seen[layer], dim=1).cpu() for layer in units}


def _generate_traced(
    lm: LoadedModel,
    messages: Sequence[Sequence[Mapping[str, str]]],
    units: dict[int, Tensor],
    params: SamplingParams,
    batch_size: int,
) -> list[dict[int, _Trace]]:
    """Generate answers while hooks project the newest position of every forward pass.

    With left padding, the last position of the prefill pass is every row's last prompt token, and each
    later pass (one token with the KV cache; the whole sequence without one) ends with the token fed in
    at that step. So ``h[:, -1]`` of pass ``i`` is the last prompt token for ``i = 0`` and generated
    token ``i`` after that. A generated token's own activation exists only once it is fed back, so we
    ask for one token more than wanted and drop it: one extra decoding step instead of a second pass.
    """
    eos = _eos_ids(lm)
    pad_id = int(lm.tokenizer.pad_token_id)
    dev_units = {layer: units[layer].to(lm.device) for layer in sorted(units)}
    results: list[dict[int, _Trace]] = []
    for start in range(0, len(messages), batch_size):
        chunk = [encode(lm.tokenizer, m) for m in messages[start : start + batch_size]]
        ids, layout, _ = pad_batch(chunk, pad_id, "left", lm.device)
        processors = LogitsProcessorList()
        if params.temperature > 0:
            # Same per-row seeds as personavec.core.generation.generate, so answers match it row for row.
            seeds = [params.seed * 1_000_003 + i for i in range(start, start + len(chunk))]
            processors.append(PerRowSampler(seeds, params.temperature, params.top_p))
        out, stacked = _hooked_generate(
            lm, ids, layout.attention_mask, dev_units, processors, params.max_new_tokens + 1
        )
        new = out[:, ids.shape[1] :].tolist()
        for row in range(len(chunk)):
            gen = new[row][: params.max_new_tokens]
            n = next((i for i, t in enumerate(gen) if t in eos), len(gen))
            token_ids = tuple(int(t) for t in gen[:n])
            tokens = tuple(
                lm.tokenizer.batch_decode(
                    [[t] for t in token_ids], skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            )
            answer = lm.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
            traces = {}
            for layer, per_pass in stacked.items():
                rows = per_pass[row]
                if rows.shape[0] < n + 1:
                    raise PersonavecError(
                        f"generation traced {rows.shape[0] - 1} tokens but produced {n}: the model's "
                        "generate loop does not run one forward pass per token"
                    )
                traces[layer] = _Trace(answer, tokens, token_ids, rows[0], rows[1 : n + 1])
            results.append(traces)
    return results


def monitor(
    lm: LoadedModel,
    vectors: PersonaVector | Sequence[PersonaVector],
    conversations: Sequence[Conversation],
    *,
    layers: int | Sequence[int] | None = None,
    generate: bool = False,
    params: SamplingParams | None = None,
    batch_size: int = 32,
) -> list[MonitorRecord]:
    """Project the last prompt token of each conversation onto each vector (and optionally trace answers).

    All vectors and layers are read from one forward pass per batch. With ``generate=True`` the prompt
    projection comes from the generation's own first pass and every generated token is projected by
    hooks during decoding (plus one extra decoding step, to read the last token's own activation).

    Args:
        lm: The loaded model.
        vectors: One or more persona vectors made for this model.
        conversations: Prompts, each ending with a user turn.
        layers: Layer index or indices for every vector (default: each vector's recommended layer).
        generate: Also generate the answers and trace every generated token.
        params: Sampling parameters for generation (greedy, 64 tokens by default).
        batch_size: Conversations per forward pass / ``generate`` call.

    Returns:
        Records ordered by conversation, then vector, then layer.

    Raises:
        PersonavecError: On a vector/model mismatch, no layer to read, a bad layer or conversation.
    """
    vecs = [vectors] if isinstance(vectors, PersonaVector) else list(vectors)
    if not vecs:
        raise PersonavecError("no vectors given: pass at least one persona vector")
    for v in vecs:
        v.check_model(lm.info.n_blocks, lm.info.hidden_size, lm.info.id)
    messages = _check_prompts(conversations)
    plan = [
        (vi, v, layer) for vi, v in enumerate(vecs) for layer in _target_layers(v, layers, lm.info.n_blocks)
    ]
    units = _unit_directions(plan)
    # Column of each plan entry inside its layer's unit matrix.
    column: list[int] = []
    per_layer: dict[int, int] = {}
    for _vi, _v, layer in plan:
        column.append(per_layer.get(layer, 0))
        per_layer[layer] = column[-1] + 1

    notes = {(vi, layer): calibration_for(v, layer, lm.info.fingerprint) for vi, v, layer in plan}
    records: list[MonitorRecord] = []
    if generate:
        traces = _generate_traced(lm, messages, units, params or SamplingParams(), batch_size)
        for ci, by_layer in enumerate(traces):
            for (vi, v, layer), col in zip(plan, column):
                t = by_layer[layer]
                x = float(t.prompt[col])
                per_token = tuple(float(p) for p in t.per_token[:, col])
                records.append(
                    replace(
                        _record(ci, vi, v, layer, x, notes[(vi, layer)]),
                        answer=t.answer,
                        tokens=t.tokens,
                        token_ids=t.token_ids,
                        token_projections=per_token,
                        response_mean=float(np.mean(per_token)) if per_token else None,
                    )
                )
        return records

    acts = capture_activations(
        lm, messages, layers=sorted(units), poolings=(last_prompt,), batch_size=batch_size
    )
    projections = {layer: acts.at("last_prompt", layer).float() @ u for layer, u in units.items()}
    for ci in range(len(messages)):
        for (vi, v, layer), col in zip(plan, column):
            records.append(_record(ci, vi, v, layer, float(projections[layer][ci, col]), notes[(vi, layer)]))
    return records


def _record(
    ci: int,
    vi: int,
    vector: PersonaVector,
    layer: int,
    x: float,
    calibration: tuple[Mapping[str, Any] | None, str | None],
) -> MonitorRecord:
    entry, note = calibration
    z, pct = score(x, entry) if entry is not None else (None, None)
    return MonitorRecord(ci, vi, vector.meta.trait, layer, x, z, pct, note)
