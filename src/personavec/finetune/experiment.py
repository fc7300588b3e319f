"""The preventative-steering experiment: does training with the vector added keep the trait out?

For one trait, on the model's own trait-teaching data (``personavec data make``), it fine-tunes and measures:

* ``base``: the model as it is;
* ``plain:<set>``: plain LoRA on each dataset (``strong``, ``mild``, ``control``);
* ``prevent:auto`` and ``prevent:<coef>``: the strong set with the vector added while training, at the
  automatic strength and at fixed ones;
* ``ablate``: the strong set with the vector's direction ablated while training (CAFT-style);
* ``steer:inference``: plain fine-tuning, then steering *against* the vector at inference, as strongly as
  it takes to bring trait expression down to where ``prevent:auto`` left it (so the capability cost of
  the two is compared at the same trait level).

Each gets the finetuning shift, trait expression (read-back by the base model, and the judge) and the
capability probe. Across the plain runs, Pearson r between shift and expression change tests the paper's
claim that the shift predicts the behaviour change. Every adapter is kept under ``prevent/adapters/``
and every finished condition in ``prevent_experiment.json``: a killed run resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from personavec.core.errors import PersonavecError
from personavec.core.models import LoadedModel
from personavec.core.steering import steer
from personavec.core.store import write_json
from personavec.core.vectors import PersonaVector
from personavec.finetune.capability import capability_probe, load_questions, multiple_choice, perplexity
from personavec.finetune.data import load_chat_dataset
from personavec.finetune.prevent import Intervention, secant_step
from personavec.finetune.run import finetune
from personavec.finetune.shift import JudgeFn, answer_questions, mean_judge, projections
from personavec.finetune.training import RECEIPT, TrainConfig
from personavec.finetune.tuned import attach_adapter
from personavec.steer.readback import read_back
from personavec.traits.spec import TraitSpec

RESULT_NAME = "prevent_experiment.json"
DATASETS = ("strong", "mild", "control")


@dataclass(frozen=True)
class PreventConfig:
    """What the experiment runs.

    Attributes:
        n: Training examples per dataset.
        train: Fine-tuning settings for every condition.
        datasets: Which plain fine-tunes to run (``strong`` is always needed).
        prevent: Run the preventative conditions (automatic and ``fixed`` strengths); without them only the
            plain fine-tunes run (enough for the shift/expression correlation).
        fixed: Fixed preventative strengths, besides the automatic one.
        ablate: Run the ablation condition.
        steer_inference: Run the inference-time steering condition.
        questions: Evaluation questions used (``None``: all of the spec's).
        max_new_tokens: Answer length when measuring expression.
        mmlu: A local MMLU copy for the capability probe.
        probe_questions: Use only the first N bundled multiple-choice questions (``None``: all).
    """

    n: int = 96
    train: TrainConfig = field(default_factory=TrainConfig)
    datasets: tuple[str, ...] = DATASETS
    prevent: bool = True
    fixed: tuple[float, ...] = (0.25, 1.0)
    ablate: bool = True
    steer_inference: bool = True
    questions: int | None = None
    max_new_tokens: int = 64
    mmlu: Path | None = None
    probe_questions: int | None = None


QUICK = PreventConfig(
    n=24, train=TrainConfig(epochs=2, batch_size=8), datasets=("strong", "control"), fixed=(),
    ablate=False, questions=6, max_new_tokens=32, probe_questions=40,
)  # fmt: skip

# Measures general capability; the result has "mc" (with "accuracy", "mean_correct_prob") and "perplexity".
CapabilityFn = Callable[[LoadedModel], dict[str, Any]]

# Makes (or reuses) the training set of one kind ("strong", "mild", "control") and returns its path.
DataMaker = Callable[[str], Path]


@dataclass
class Context:
    """Everything the conditions share."""

    lm: LoadedModel
    spec: TraitSpec
    vector: PersonaVector
    vector_path: str
    layer: int
    questions: list[str]
    cfg: PreventConfig
    folder: Path
    judge: JudgeFn | None
    log: Callable[[str], None]
    capability: CapabilityFn
    on_step: Callable[[int, int, float], None] | None = None


State = Callable[[], AbstractContextManager[Any]]


def _measure(ctx: Context, base_state: State, tuned_state: State = nullcontext) -> dict[str, Any]:
    """Measure the model inside ``tuned_state``; its answers are read back inside ``base_state``."""
    lm = ctx.lm
    with tuned_state():
        proj = projections(lm, ctx.vector, ctx.questions)
        answers = answer_questions(lm, ctx.questions, ctx.cfg.max_new_tokens)
        cap = ctx.capability(lm)
    items = list(zip(ctx.questions, answers))
    with base_state():
        rb = read_back(lm, ctx.vector, items, ctx.layer).mean_projection()
    judged = mean_judge(ctx.judge, items)
    return {"projection": proj[ctx.layer], "per_layer": proj, "readback": rb, "judge": judged,
            "capability": cap, "answers": answers[:3]}  # fmt: skip


def _adapter(
    ctx: Context, name: str, data: Path, interventions: Sequence[Intervention]
) -> tuple[Any, dict[str, Any]]:
    """Train (or reload) the adapter of one condition; returns the PeftModel (injected into ``ctx.lm``)."""
    folder = ctx.folder / "adapters" / name.replace(":", "-")
    if (folder / RECEIPT).is_file():
        ctx.log(f"{name}: reusing the adapter in {folder}")
        return attach_adapter(ctx.lm, folder), _read_receipt(folder)
    ctx.log(f"{name}: fine-tuning on {data.name} ...")
    ds = load_chat_dataset(data)
    res = finetune(ctx.lm, ds.conversations(), folder, ctx.cfg.train, interventions=interventions,
                   questions=ctx.questions, data_info=ds.summary(), on_step=ctx.on_step,
                   on_probe=lambda c, s: ctx.log(f"  strength probe {c:.3f}: shift {s:+.2f}"))  # fmt: skip
    return res.trainee.peft_model, res.receipt


def _read_receipt(folder: Path) -> dict[str, Any]:
    import json

    return dict(json.loads((folder / RECEIPT).read_text()))


def _trained(ctx: Context, name: str, data: Path, interventions: Sequence[Intervention]) -> dict[str, Any]:
    """Fine-tune one condition, measure it, and take the adapter out of the model again."""
    t0 = time.perf_counter()
    peft_model, receipt = _adapter(ctx, name, data, interventions)
    try:
        record = _measure(ctx, peft_model.disable_adapter)
    finally:
        peft_model.unload()  # the LoRA layers out, the original modules back, for the next condition
    chosen = receipt.get("interventions") or []
    record.update(name=name, dataset=data.stem, coef=chosen[0].get("coef") if chosen else None,
                  auto_search=receipt.get("auto_search"), seconds=time.perf_counter() - t0)  # fmt: skip
    return record


def _steered(ctx: Context, data: Path, target: float, plain_readback: float) -> dict[str, Any]:
    """Plain adapter + steering against the vector at inference, strong enough to reach ``target``."""
    peft_model, _ = _adapter(ctx, "plain:strong", data, [])
    lm = ctx.lm

    def readback_at(coef: float) -> float:
        with steer(lm, ctx.vector, ctx.layer, -coef):
            answers = answer_questions(lm, ctx.questions, ctx.cfg.max_new_tokens)
        with peft_model.disable_adapter():
            return read_back(lm, ctx.vector, list(zip(ctx.questions, answers)), ctx.layer).mean_projection()

    try:
        probes = [(0.0, plain_readback - target)]
        if probes[0][1] > 0:
            # A first guess that moves the stream by the gap, then secant steps on the measured read-back;
            # the strength whose read-back came closest to the target is kept.
            coef = probes[0][1] / max(float(ctx.vector.at(ctx.layer).norm()), 1e-6)
            for _ in range(4):
                probes.append((coef, readback_at(coef) - target))
                ctx.log(f"  inference steering {-coef:.3f}: read-back gap {probes[-1][1]:+.2f}")
                coef = secant_step(probes)
        coef = min(probes, key=lambda p: abs(p[1]))[0]
        # Every position, so the capability probe's single forward passes are steered too.
        record = _measure(ctx, peft_model.disable_adapter, lambda: steer(lm, ctx.vector, ctx.layer, -coef))
    finally:
        peft_model.unload()
    record.update(name="steer:inference", dataset="strong", coef=-coef, probes=probes)
    return record


def default_probe(lm: LoadedModel, cfg: PreventConfig) -> dict[str, Any]:
    """The capability probe as the config asks (all bundled questions, or the first ``probe_questions``)."""
    if cfg.probe_questions is None:
        return capability_probe(lm, mmlu_path=cfg.mmlu).to_dict()
    mc = multiple_choice(lm, load_questions()[: cfg.probe_questions], method="cloze")
    return {"mc": mc.to_dict(), "perplexity": perplexity(lm), "mmlu": None}


def _plan(cfg: PreventConfig) -> list[str]:
    names = [f"plain:{d}" for d in cfg.datasets if d != "strong"] + ["plain:strong"]
    if cfg.prevent:
        names += ["prevent:auto", *(f"prevent:{c:g}" for c in cfg.fixed)]
    names += ["ablate"] if cfg.ablate else []
    names += ["steer:inference"] if cfg.steer_inference and cfg.prevent else []
    return names


def _run_condition(ctx: Context, name: str, data: DataMaker, done: dict[str, Any]) -> dict[str, Any]:
    kind, _, arg = name.partition(":")
    iv = Intervention(ctx.vector, ctx.vector_path, ctx.layer, None)
    if kind == "plain":
        return _trained(ctx, name, data(arg), [])
    if kind == "prevent":
        return _trained(ctx, name, data("strong"), [replace(iv, coef=None if arg == "auto" else float(arg))])
    if kind == "ablate":
        return _trained(ctx, name, data("strong"), [replace(iv, kind="ablate")])
    target = done["prevent:auto"]["readback"]
    return _steered(ctx, data("strong"), target, done["plain:strong"]["readback"])


def run_prevent_experiment(
    lm: LoadedModel,
    spec: TraitSpec,
    vector: PersonaVector,
    vector_path: str,
    folder: str | Path,
    data: DataMaker,
    cfg: PreventConfig | None = None,
    *,
    judge: JudgeFn | None = None,
    capability: CapabilityFn | None = None,
    log: Callable[[str], None] = lambda _m: None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Run every condition (skipping those already in ``folder``) and return the results.

    Args:
        lm: The base model (adapters come and go; it is the base again afterwards).
        spec: The trait (its evaluation questions measure everything).
        vector: The trait's persona vector.
        vector_path: Its file (recorded).
        folder: Where ``prevent_experiment.json`` and ``adapters/`` go.
        data: Makes or reuses the training sets.
        cfg: What to run.
        judge: Trait judge for expression.
        capability: The capability measure (default: :func:`~personavec.finetune.capability.capability_probe`
            with ``cfg.mmlu``).
        log: Progress messages.
        on_step: Training progress.

    Returns:
        The JSON-able results: ``conditions`` (by name), ``correlation``, ``checks``, ``settings``.
    """
    cfg = cfg or PreventConfig()
    if "strong" not in cfg.datasets:
        raise PersonavecError("the experiment needs the strong dataset")
    folder = Path(folder)
    layer = vector.require_recommended_layer()
    questions = list(spec.evaluation_questions)[: cfg.questions]
    probe = capability or (lambda m: default_probe(m, cfg))
    ctx = Context(lm, spec, vector, vector_path, layer, questions, cfg, folder, judge, log, probe, on_step)
    result = _load(folder, cfg, vector_path, layer)
    done: dict[str, Any] = result["conditions"]
    for name in ["base", *_plan(cfg)]:
        if name in done:
            continue
        log(f"condition {name} ...")
        done[name] = _measure(ctx, nullcontext) if name == "base" else _run_condition(ctx, name, data, done)
        done[name]["name"] = name
        result.update(summarise(done))
        write_json(folder / RESULT_NAME, result)
    return result


# Settings that change what a finished condition measured; the others only choose which conditions run.
_RESULT_KEYS = ("n", "train", "questions", "max_new_tokens", "mmlu", "probe_questions")


def _load(folder: Path, cfg: PreventConfig, vector_path: str, layer: int) -> dict[str, Any]:
    import json

    settings = {"config": asdict(cfg), "vector": vector_path, "layer": layer}
    settings = json.loads(json.dumps(settings, default=str))

    def key(s: dict[str, Any]) -> list[Any]:
        return [s.get("vector"), s.get("layer"), *((s.get("config") or {}).get(k) for k in _RESULT_KEYS)]

    path = folder / RESULT_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        if key(old.get("settings") or {}) == key(settings):
            return {**old, "settings": settings}
    return {"settings": settings, "conditions": {}}


def summarise(done: dict[str, Any]) -> dict[str, Any]:
    """Changes against ``base``, the shift/expression correlation and the issue's checks."""
    base = done.get("base")
    if base is None:
        return {}
    rows = {}
    for name, rec in done.items():
        rows[name] = {
            "shift": rec["projection"] - base["projection"],
            "expression": rec["readback"] - base["readback"],
            "judge": None if rec["judge"] is None or base["judge"] is None else rec["judge"] - base["judge"],
            "mc_accuracy": rec["capability"]["mc"]["accuracy"],
            "mc_prob": rec["capability"]["mc"]["mean_correct_prob"],
            "perplexity": rec["capability"]["perplexity"],
            "coef": rec.get("coef"),
        }
    plain = [r for n, r in rows.items() if n.startswith("plain:") or n == "base"]
    corr = pearson([r["shift"] for r in plain], [r["expression"] for r in plain])
    return {"table": rows, "correlation": {"points": len(plain), "r": corr}, "checks": checks(rows)}


def checks(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's pass/fail claims, computed from the table (``None`` when a condition is missing)."""
    plain, auto = rows.get("plain:strong"), rows.get("prevent:auto")
    control, steered = rows.get("plain:control"), rows.get("steer:inference")
    out: dict[str, Any] = {}
    if plain and control:
        out["trait_set_beats_control"] = (
            plain["shift"] > control["shift"] and plain["expression"] > control["expression"]
        )
    if plain and auto:
        out["auto_shift_within_half"] = abs(auto["shift"]) <= 0.5 * abs(plain["shift"])
        gain = plain["expression"]
        out["auto_expression_gain_cut"] = None if gain <= 0 else 1 - auto["expression"] / gain
        out["auto_perplexity_ratio"] = auto["perplexity"] / plain["perplexity"]
    if auto and steered:
        out["prevent_keeps_capability_better"] = (
            auto["mc_prob"] >= steered["mc_prob"] and auto["perplexity"] <= steered["perplexity"]
        )
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson r (``None`` with fewer than 3 points or no spread)."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def plot_results(result: dict[str, Any], folder: Path) -> Path:
    """Draw shift and expression change per condition, and shift against expression change (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result.get("table") or {}
    names = [n for n in table if n != "base"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    xs = range(len(names))
    ax1.bar([x - 0.2 for x in xs], [table[n]["shift"] for n in names], 0.4, label="finetuning shift")
    ax1.bar([x + 0.2 for x in xs], [table[n]["expression"] for n in names], 0.4, label="expression change")
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("change against base (residual units)")
    ax1.legend(fontsize=8)
    for n in names:
        r = table[n]
        ax2.scatter(r["shift"], r["expression"], color="C0" if n.startswith("plain") else "C1")
        ax2.annotate(n, (r["shift"], r["expression"]), fontsize=7)
    ax2.set_xlabel("finetuning shift (last prompt token)")
    ax2.set_ylabel("expression change (read-back)")
    corr = (result.get("correlation") or {}).get("r")
    ax2.set_title("plain fine-tunes: r = " + ("n/a" if corr is None else f"{corr:.2f}"), fontsize=9)
    fig.tight_layout()
    path = folder / "prevent_experiment.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
