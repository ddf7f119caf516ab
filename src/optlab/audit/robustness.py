"""Does compression bring forgotten knowledge back? The pieces of ``optlab audit robustness``
that need no model: the attack specs, the recovery ratio, the table and the plots.

Zhang et al. ("Catastrophic Failure of LLM Unlearning via Quantization", ICLR 2025, arXiv
2410.16454) find that unlearning with a utility term keeps 21% of the forgotten knowledge at
full precision and 83% after 4-bit quantization: small unlearning updates round back to the
original weights' grid points. Łucki et al. (arXiv 2409.18025) recover unlearned knowledge
by pruning or by fine-tuning on unrelated examples, Deeb & Roger (arXiv 2410.08827) by
relearning on facts disjoint from the forgotten ones. Each attack here is applied to the
unlearned model and, for reference, to the model before unlearning; on every forget-side
metric (higher = more of the forget set known)::

    recovery = (attacked - unlearned) / (before - unlearned)

with ``before`` and ``unlearned`` at full precision: 0 = the attack brings nothing back,
1 = it brings back everything unlearning removed. Where unlearning removed less than
``min_gap`` on a metric there is nothing to recover, and the ratio is null with the reason
(a near-zero denominator would turn noise into a huge ratio, a negative one flip its sign).

>>> parse_attack("quant:gptq4")
Attack(spec='quant:gptq4', kind='quant', method='gptq', amount=4)
>>> parse_attack("gguf:q4_1")
Attack(spec='gguf:q4_1', kind='gguf', method='q4_1', amount=4)
>>> recovery_ratio(attacked=0.5, unlearned=0.2, before=0.8)
0.5
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.errors import OptlabError, did_you_mean

# kind -> the pattern of what follows "kind:" (its method and amount).
ATTACK_FORMS = {
    "quant": re.compile(r"(?P<method>rtn|gptq)(?P<amount>\d+)"),  # uniform B-bit, packed
    # The model as a GGUF file of that type runs it (llama.cpp, Ollama): amount = its bits.
    "gguf": re.compile(r"(?P<method>q8_0|q5_1|q5_0|q4_1|q4_0)"),
    "prune": re.compile(r"(?P<method>magnitude|wanda|sparsegpt)(?P<amount>\d+)"),  # P% sparsity
    "relearn": re.compile(r"(?P<method>)(?P<amount>\d+)"),  # fine-tune on N disjoint examples
}
ATTACK_EXAMPLES = ("quant:rtn4", "quant:rtn8", "quant:gptq4", "quant:gptq8", "gguf:q4_0",
                   "gguf:q4_1", "gguf:q5_0", "gguf:q5_1", "gguf:q8_0", "prune:magnitude50",
                   "prune:wanda50", "prune:sparsegpt50", "relearn:N")  # fmt: skip
NONE = "none"  # the table's row of each model as it is

# Forget-side metrics (higher = more of the forget set known): what a recovery ratio is of.
FORGET_METRICS = ("FA", "rougeL", "exact_match", "mia_loss", "mia_zlib", "mia_mink",
                  "mia_minkpp")  # fmt: skip
# The per-example metrics a paired bootstrap can resample (the others are one number).
PER_EXAMPLE = ("FA", "rougeL", "exact_match")
TABLE_METRICS = ("FA", "rougeL", "exact_match", "RA", "ppl", "mia_loss", "mia_mink",
                 "mia_minkpp")  # fmt: skip
SKEB = "skeb_"  # prefix of the SKeB recall per framing (skeb_plain, skeb_authority, ...)


@dataclass(frozen=True)
class Attack:
    """One attack: ``quant`` (``amount`` bits, ``method`` rtn or gptq), ``gguf`` (the model
    written as a GGUF file with block linears of type ``method``, ``amount`` bits, and read
    back), ``prune`` (``amount`` percent sparsity by ``method``) or ``relearn`` (fine-tuning on
    ``amount`` examples)."""

    spec: str
    kind: str
    method: str
    amount: int


def parse_attack(spec: str) -> Attack:
    """An attack from its spec (``quant:rtn4``, ``gguf:q4_1``, ``prune:wanda50``,
    ``relearn:20``); a typo gets the closest valid forms."""
    kind, _, rest = str(spec).strip().partition(":")
    form = ATTACK_FORMS.get(kind)
    found = form.fullmatch(rest) if form else None
    if found is None:
        raise did_you_mean("attack", str(spec), ATTACK_EXAMPLES)
    method = found.group("method")
    # A GGUF type names its bits: q4_1 -> 4.
    amount = int(found.group("amount") if "amount" in form.groupindex else method[1])
    if kind == "prune" and not 0 < amount < 100:
        raise OptlabError(f"attack {spec!r}: the sparsity is a percentage in 1..99")
    if kind == "relearn" and amount < 1:
        raise OptlabError(f"attack {spec!r}: relearning needs at least one example")
    return Attack(f"{kind}:{rest}", kind, method, amount)


@configurable("robustness")
@dataclass(frozen=True)
class RobustnessConfig:
    """Which attacks, and how each is made (the quantization grid, the relearning budget).

    >>> RobustnessConfig(attacks=("quant:rtn4", "relearn:8")).parsed[1].amount
    8
    """

    attacks: tuple[str, ...] = option(
        ("quant:rtn4", "quant:rtn8"),
        "comma-separated: quant:rtnB|gptqB (B bits: 2, 3, 4, 8), gguf:q4_0|q4_1|q5_0|q5_1|q8_0 "
        "(the model as `optlab export --type T` writes it and llama.cpp runs it), "
        "prune:magnitudeP|wandaP|sparsegptP (P% sparsity), relearn:N (N disjoint examples)",
        metavar="A1,A2",
    )
    group_size: int = option(128, "quant attacks: columns per scale; 0 = per output channel")
    relearn_steps: int = option(20, "relearn: optimizer steps (batch --relearn-batch)")
    relearn_batch: int = option(2, "relearn: examples per step")
    relearn_lr: float = option(1e-3, "relearn: learning rate (LoRA; ~1e-5 with --relearn-full)")
    relearn_full: bool = option(False, "relearn: train every weight, not LoRA on q/v")
    skeb: bool = option(True, "do not run the SKeB persuasion probes on question forget sets",
                        flag="--no-skeb")  # fmt: skip
    skeb_limit: int | None = option(None, "SKeB: probe only the first N forget facts")
    skeb_max_new_tokens: int = option(40, "SKeB: tokens generated per answer")
    min_gap: float = option(0.01, "recovery: the least before - unlearned gap a ratio is "
                            "computed for")  # fmt: skip
    resamples: int = option(1000, "bootstrap resamples of each 95% interval")

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", tuple(a.strip() for a in self.attacks if a.strip()))
        require(bool(self.attacks), "give at least one attack (--attacks)")
        specs = [a.spec for a in self.parsed]
        require(len(set(specs)) == len(specs), f"an attack is repeated in {','.join(specs)}")
        require_positive(self, "relearn_steps", "relearn_batch", "skeb_limit",
                         "skeb_max_new_tokens", "resamples")  # fmt: skip
        require_finite(self, "relearn_lr", "min_gap")
        require(self.relearn_lr > 0, f"relearn_lr must be positive, got {self.relearn_lr}")
        require(self.min_gap >= 0, f"min_gap must be 0 or more, got {self.min_gap}")
        require(isinstance(self.group_size, int) and self.group_size >= 0,
                f"group size must be a whole number >= 0, got {self.group_size!r}")  # fmt: skip

    @property
    def parsed(self) -> list[Attack]:
        return [parse_attack(a) for a in self.attacks]


def recovery_ratio(
    attacked: float | None, unlearned: float | None, before: float | None, min_gap: float = 0.0
) -> float | None:
    """(attacked - unlearned) / (before - unlearned), or None where it means nothing: a value
    is missing or NaN, or unlearning lowered the metric by ``min_gap`` or less (nothing was
    forgotten that could come back)."""
    values = (attacked, unlearned, before)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    gap = before - unlearned  # type: ignore[operator]
    if gap <= min_gap:
        return None
    return (attacked - unlearned) / gap  # type: ignore[operator]


def degenerate_reason(unlearned: float | None, before: float | None, min_gap: float) -> str:
    """Why a recovery ratio is null (for the report)."""
    if unlearned is None or before is None or not math.isfinite(unlearned - before):
        return "not measured"
    return (f"unlearning removed {before - unlearned:+.3g} (before {before:.3g}, unlearned "
            f"{unlearned:.3g}), not more than {min_gap:g}: nothing to recover")  # fmt: skip


def recovery_table(
    models: Mapping[str, Mapping[str, Mapping[str, Any]]],
    intervals: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    min_gap: float = 0.0,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per attack and forget-side metric: the ratio (and its interval where ``intervals``
    holds one), or null with the reason. ``models`` is ``{"before" | "unlearned": {NONE |
    attack: metrics}}``."""
    before, unlearned = models["before"][NONE], models["unlearned"][NONE]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for attack, metrics in models["unlearned"].items():
        if attack == NONE:
            continue
        row = {}
        for metric in forget_metrics(before):
            ratio = recovery_ratio(metrics.get(metric), unlearned.get(metric),
                                   before.get(metric), min_gap)  # fmt: skip
            cell: dict[str, Any] = {"ratio": ratio}
            if ratio is None:
                cell["reason"] = degenerate_reason(unlearned.get(metric), before.get(metric),
                                                   min_gap)  # fmt: skip
            elif intervals and metric in intervals.get(attack, {}):
                cell |= {k: intervals[attack][metric][k] for k in ("low", "high")}
            row[metric] = cell
        table[attack] = row
    return table


def forget_metrics(metrics: Mapping[str, Any]) -> list[str]:
    """The forget-side metrics a model's results hold (NaN ones dropped: FA on documents)."""
    names = [m for m in FORGET_METRICS if m in metrics] + sorted(
        m for m in metrics if m.startswith(SKEB))  # fmt: skip
    return [m for m in names if isinstance(metrics[m], float) and math.isfinite(metrics[m])]


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3g}"
    return "-"


def markdown_table(
    models: Mapping[str, Mapping[str, Mapping[str, Any]]],
    recovery: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> str:
    """The one table: every model x attack with its metrics, then the recovery ratios."""
    first = models["unlearned"][NONE]
    columns = [m for m in (*TABLE_METRICS, *sorted(k for k in first if k.startswith(SKEB)))
               if isinstance(first.get(m), float) and math.isfinite(first[m])]  # fmt: skip
    lines = ["| model | attack | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    for role, by_attack in models.items():
        for attack, metrics in by_attack.items():
            cells = " | ".join(_cell(metrics.get(c)) for c in columns)
            lines.append(f"| {role} | {attack} | {cells} |")
    metrics_shown = list(dict.fromkeys(m for row in recovery.values() for m in row))
    if metrics_shown:
        lines += ["", "Recovery (attacked - unlearned) / (before - unlearned), 95% bootstrap "
                  "interval:", "", "| attack | " + " | ".join(metrics_shown) + " |",
                  "|---" * (len(metrics_shown) + 1) + "|"]  # fmt: skip
        for attack, row in recovery.items():
            lines.append(f"| {attack} | " + " | ".join(_ratio_cell(row.get(m, {}))
                                                       for m in metrics_shown) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _ratio_cell(cell: Mapping[str, Any]) -> str:
    ratio = cell.get("ratio")
    if ratio is None:
        return "n/a"
    if cell.get("low") is None:
        return f"{ratio:.2f}"
    return f"{ratio:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]"


def headline_metric(models: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The forget metric the plots show: FA for questions, rougeL for documents."""
    names = forget_metrics(models["before"][NONE])
    return next((m for m in ("FA", "rougeL") if m in names), names[0] if names else "FA")


def plots(
    models: Mapping[str, Mapping[str, Mapping[str, Any]]],
    recovery: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, bytes]:
    """``forget_by_attack.png`` (the headline forget metric of both models under every
    attack) and ``recovery.png`` (its recovery ratio per attack with the interval)."""
    from optlab.audit import plots as draw

    metric = headline_metric(models)
    attacks = list(models["unlearned"])
    series = {role: [float(by_attack[a].get(metric, math.nan)) for a in attacks]
              for role, by_attack in models.items()}  # fmt: skip
    out = {"forget_by_attack.png": draw.grouped_bars(
        attacks, series, f"{metric} on the forget set by attack", metric)}  # fmt: skip
    cells = [recovery[a].get(metric, {}) for a in attacks if a != NONE]
    ratios = [math.nan if c.get("ratio") is None else c["ratio"] for c in cells]
    errors = None
    if cells and all(c.get("low") is not None for c in cells):
        errors = [(c["low"], c["high"]) for c in cells]
    out["recovery.png"] = draw.bars([a for a in attacks if a != NONE], ratios,
                                    f"Recovery of {metric} (95% CI)",
                                    "(attacked - unlearned) /\n(before - unlearned)",
                                    errors=errors)  # fmt: skip
    return out


def skeb_recall(summary: Mapping[str, Any]) -> dict[str, float]:
    """``skeb_<framing>``: the mean recall per framing of a SKeB summary."""
    return {f"{SKEB}{framing}": float(stats["recall"]["mean"])
            for framing, stats in summary["framings"].items()}  # fmt: skip


def _keys(forget: Sequence[Any]) -> set[str]:
    return {e.text for e in forget} | {e.question for e in forget if e.question is not None}


def overlaps(example: Any, keys: set[str]) -> bool:
    """Whether ``example`` shares its text or its question with the forget set's ``keys``."""
    return example.text in keys or (example.question is not None and example.question in keys)


def relearn_set(
    forget: Sequence[Any], candidates: Sequence[Any], n: int, evaluated: int = 0
) -> list[Any]:
    """The ``n`` relearning examples: candidates (the run's retain set) that share neither
    text nor question with any forget example, those past the first ``evaluated`` (the ones
    RA is measured on) first, so relearning inflates RA only when it must."""
    keys = _keys(forget)
    ordered = [*candidates[evaluated:], *candidates[:evaluated]]
    pool = [e for e in ordered if not overlaps(e, keys)]
    if n > len(pool):
        raise OptlabError(f"relearn:{n} needs {n} examples disjoint from the forget set; the "
                          f"run's retain set has {len(pool)}")  # fmt: skip
    return pool[:n]
