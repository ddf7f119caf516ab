"""What ``optlab exit bench`` measures: every exit setting on the same completion samples, in
one process, against the all-layers run of the same model (spec sections 3 and 4).

Settings, in this order: all layers (``none``, the baseline every figure is set against),
the PPO policy at each tau (with a policy), the confidence rule at each tau, each fixed exit,
and exact self-speculation at each draft exit E. Each decodes every sample through
:func:`~optlab.early_exit.generate.generate_samples` (the one per-sample driver) inside one
:class:`~optlab.early_exit.energy.EnergyMeter` window, after one untimed warm-up sample.

The proxy's work count (:meth:`EnergyMeter.count`) is the decoder-block runs and LM-head
evaluations the decoder really did: the context's prefill (all layers), each token's
executed layers, pending positions recomputed (``--kv recompute``), and for speculation
every draft (E blocks) and verification (the blocks above E over the drafts, all blocks for
the last one); head calls are one per token, plus the confidence rule's at each exit it
consulted, plus the drafts' and the verified chunk's. The ``--kv copy`` fills (a skipped
block run only as far as its keys and values) are not counted as block runs; their cost is
in the seconds and joules.

>>> config = BenchConfig(taus=(0.5,), fixed=(1,), speculative=(1,))
>>> [name for name, _ in config.settings(new_tokens=15)]
['none', 'confidence@0.5', 'fixed:1', 'speculative:1']
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from optlab.core.anatomy import Anatomy
from optlab.core.config import configurable, option, require
from optlab.core.models import LoadedModel
from optlab.early_exit.data import Sample
from optlab.early_exit.decode import KV_MODES
from optlab.early_exit.energy import BACKENDS, EnergyMeter, Measurement
from optlab.early_exit.exits import exits_of, resolve_exits
from optlab.early_exit.generate import GenerateConfig, generate_samples, summary
from optlab.early_exit.metrics import completion_metrics
from optlab.early_exit.rules import require_tau

BASELINE = "none"
QUALITY = ("exact_match", "edit_similarity", "rouge_l", "chrf", "bleu")
TAUS = (0.6, 0.8, 0.9, 0.92, 0.94)  # the tau sweep of the issue (the paper adds .91, .93)
PLOTS = ("quality_vs_layers.png", "quality_vs_cost.png", "speculative.png")


@configurable("exit-bench")
@dataclass(frozen=True)
class BenchConfig:
    """The settings ``optlab exit bench`` runs (all layers always, first)."""

    taus: tuple[float, ...] = option(TAUS, "thresholds in (0, 1) of "
                                     "the policy and the confidence rule (the paper's sweep)",
                                     metavar="T,T,...")  # fmt: skip
    policy: str | None = option(None, "a run of `optlab exit policy`: its policy at each tau",
                                metavar="DIR")  # fmt: skip
    fixed: tuple[int, ...] = option((), "fixed exit layers to run", metavar="L,L,...")
    speculative: tuple[int, ...] = option((), "draft exits E of exact self-speculative "
                                          "decoding", metavar="E,E,...")  # fmt: skip
    draft_tokens: int = option(4, "tokens drafted per round of --speculative")
    kv: str = option("copy", "keys/values of the layers a token skipped (see `exit generate`)",
                     choices=KV_MODES)  # fmt: skip
    exits: str | None = option(None, "allowed exits of the policy and confidence rules (default: "
                               "an `exit train` run's own, else auto)",
                               metavar="auto|L,L,...")  # fmt: skip
    energy: str = option("auto", "energy meter: auto (NVML for a GPU model, else RAPL where "
                         "readable, else the proxy), nvml, rapl or proxy",
                         choices=BACKENDS)  # fmt: skip
    split: str = option("test", "the data split the samples come from",
                        choices=("train", "dev", "test"))  # fmt: skip

    def __post_init__(self) -> None:
        require(bool(self.taus), "--taus: give at least one threshold, e.g. 0.9")
        for tau in self.taus:
            require_tau(tau)
        for name, layers in (("fixed", self.fixed), ("speculative", self.speculative)):
            require(all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                        for x in layers),
                    f"--{name}: give layers of at least 1, e.g. 3,6")  # fmt: skip
        require(self.draft_tokens >= 1, f"--draft-tokens must be at least 1, got "
                f"{self.draft_tokens}")  # fmt: skip
        if self.exits is not None:
            resolve_exits(self.exits, 10**6)  # the syntax now; the range once the model is known

    def settings(self, new_tokens: int) -> list[tuple[str, GenerateConfig]]:
        """Each setting's name and the generation config that runs it."""
        common = {"kv": self.kv, "exits": self.exits, "max_new_tokens": new_tokens,
                  "draft_tokens": self.draft_tokens}  # fmt: skip
        out = [(BASELINE, GenerateConfig(**common))]
        if self.policy is not None:
            out += [(f"policy@{t}", GenerateConfig(exit="policy", tau=t, policy=self.policy,
                                                   **common)) for t in self.taus]  # fmt: skip
        out += [(f"confidence@{t}", GenerateConfig(exit="confidence", tau=t, **common))
                for t in self.taus]  # fmt: skip
        out += [(f"fixed:{layer}", GenerateConfig(exit=f"fixed:{layer}", **common))
                for layer in self.fixed]  # fmt: skip
        out += [(f"speculative:{e}", GenerateConfig(speculative=e, **common))
                for e in self.speculative]  # fmt: skip
        return out


def method_of(name: str) -> str:
    """``confidence@0.9`` -> ``confidence``; ``fixed:8`` -> ``fixed``."""
    return name.split("@")[0].split(":")[0]


def work(
    row: dict[str, Any], gen: GenerateConfig, allowed: Sequence[int], layers: int
) -> tuple[int, int]:
    """The block runs and LM-head evaluations one sample's decoding did (module docstring)."""
    blocks = (row["context_tokens"] - 1) * layers  # the prefill: all but the last token
    if gen.speculative is not None:
        blocks += row["drafted"] * gen.speculative + row["rounds"] * layers + row["recomputed"]
        return blocks, 2 * row["drafted"] + row["rounds"]
    blocks += sum(row["executed_layers"]) + row["recomputed"]
    if gen.exit != "confidence":
        return blocks, row["tokens"]
    below = [e for e in allowed if e < layers]  # the rule reads the head at each one it passes
    heads = sum(sum(e <= ran for e in below) + (ran == layers) for ran in row["executed_layers"])
    return blocks, heads


def _relative(value: float | None, base: float | None) -> float | None:
    """value / base; 1 where both are 0 (no change), None where only the base is 0."""
    if value is None or base is None:
        return None
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def run_bench(
    lm: LoadedModel, config: BenchConfig, samples: Sequence[Sample], *, progress: bool = True
) -> dict[str, Any]:
    """Every setting of ``config`` on ``samples`` (each with ``new_tokens`` to generate, the
    length of the GenerateConfig): per setting the mean executed layers, quality against
    the references and relative to all layers, seconds and energy per sample, and for
    speculation tokens/s, acceptance and the outputs identical to all layers'."""
    layers = len(Anatomy.of(lm.model).blocks)
    allowed = exits_of(lm, config.exits)
    new_tokens = max(len(s.target_ids) for s in samples)
    prompts = [s.context_ids.tolist() for s in samples]
    references = [s.target for s in samples]
    meter = EnergyMeter(config.energy, model=lm.model)
    settings = config.settings(new_tokens)
    generate_samples(lm, settings[0][1], prompts[:1], progress=False)  # warm-up, untimed
    results: dict[str, dict[str, Any]] = {}
    texts: dict[str, list[str]] = {}
    for name, gen in tqdm(settings, desc="settings", disable=not progress or None):
        with meter:
            rows = generate_samples(lm, gen, prompts, progress=progress)
            for row in rows:
                meter.count(*work(row, gen, allowed, layers))
        assert meter.result is not None
        texts[name] = [row["text"] for row in rows]
        results[name] = _measured(name, rows, references, meter.result, layers)
    for name, result in results.items():
        _against_all_layers(result, results[BASELINE], texts[name], texts[BASELINE])
    return {"model": lm.spec, "layers": layers, "exits": list(allowed),
            "energy_backend": meter.name, "samples": len(samples), "new_tokens": new_tokens,
            "kv": config.kv, "settings": results}  # fmt: skip


def _measured(
    name: str, rows: list[dict[str, Any]], references: list[str], cost: Measurement, layers: int
) -> dict[str, Any]:
    mean = summary(rows)
    n = len(rows)
    out = {"method": method_of(name), "layers": mean["layers"],
           "layers_fraction": mean["layers"] / layers, "tokens": mean["tokens"],
           "seconds_per_sample": cost.seconds / n, "tokens_per_second": mean["tokens_per_second"],
           "quality": completion_metrics([r["text"] for r in rows], references),
           "energy": cost.to_dict(),
           "joules_per_sample": None if cost.joules is None else cost.joules / n,
           "flops_per_sample": None if cost.flops is None else cost.flops / n}  # fmt: skip
    if "acceptance" in mean:
        out["acceptance"] = mean["acceptance"]
        out["draft_layer"] = int(name.split(":")[1])
    return out


def _against_all_layers(
    result: dict[str, Any], base: dict[str, Any], texts: list[str], base_texts: list[str]
) -> None:
    """Each figure over the all-layers run's; outputs identical to it."""
    result["relative"] = {
        **{k: _relative(result["quality"][k], base["quality"][k]) for k in QUALITY},
        "layers": _relative(result["layers"], base["layers"]),
        "seconds": _relative(result["seconds_per_sample"], base["seconds_per_sample"]),
        "energy": _relative(result["joules_per_sample"], base["joules_per_sample"])
        if base["joules_per_sample"] is not None
        else _relative(result["flops_per_sample"], base["flops_per_sample"]),
        "tokens_per_second": _relative(result["tokens_per_second"], base["tokens_per_second"]),
    }
    result["identical"] = sum(a == b for a, b in zip(texts, base_texts, strict=True))


COLUMNS = (  # (header, how a setting's figure is read)
    ("setting", lambda n, r: n),
    ("layers", lambda n, r: r["layers"]),
    ("layers vs all", lambda n, r: r["relative"]["layers"]),
    *((k, lambda n, r, k=k: r["quality"][k]) for k in QUALITY),
    ("rouge_l vs all", lambda n, r: r["relative"]["rouge_l"]),
    ("edit_similarity vs all", lambda n, r: r["relative"]["edit_similarity"]),
    ("s / sample", lambda n, r: r["seconds_per_sample"]),
    ("time vs all", lambda n, r: r["relative"]["seconds"]),
    ("J / sample", lambda n, r: r["joules_per_sample"]),
    ("GFLOPs / sample", lambda n, r: None if r["flops_per_sample"] is None
     else r["flops_per_sample"] / 1e9),
    ("energy vs all", lambda n, r: r["relative"]["energy"]),
    ("tokens/s", lambda n, r: r["tokens_per_second"]),
    ("acceptance", lambda n, r: r.get("acceptance")),
    ("identical", lambda n, r: r["identical"]),
)  # fmt: skip


def table(bench: dict[str, Any]) -> list[list[Any]]:
    """The results table: a header, then one row per setting."""
    rows = [[header for header, _ in COLUMNS]]
    for name, result in bench["settings"].items():
        rows.append([read(name, result) for _, read in COLUMNS])
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def results_csv(bench: dict[str, Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        [["" if v is None else v for v in row] for row in table(bench)]
    )
    return buffer.getvalue()


def results_markdown(bench: dict[str, Any]) -> str:
    header, *rows = table(bench)
    lines = [f"{bench['model']}: {bench['samples']} samples x {bench['new_tokens']} new tokens, "
             f"{bench['layers']} layers, exits {','.join(map(str, bench['exits']))}, --kv "
             f"{bench['kv']}; energy: {bench['energy_backend']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_plots(bench: dict[str, Any], folder: Path) -> list[str]:
    """PNG plots into ``folder`` (matplotlib, Agg); the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = bench["settings"]
    base = settings[BASELINE]
    curves: dict[str, list[dict[str, Any]]] = {}
    for result in settings.values():
        if result["method"] in ("policy", "confidence", "fixed"):
            curves.setdefault(result["method"], []).append(result)
    energy = "energy (J)" if bench["energy_backend"] != "proxy" else "energy (FLOPs proxy)"
    axes_of = {
        "quality_vs_layers.png": [(lambda r: r["layers"], "mean executed layers", metric)
                                  for metric in ("rouge_l", "edit_similarity")],
        "quality_vs_cost.png": [(lambda r: r["relative"]["energy"], f"{energy} vs all layers",
                                 "rouge_l"),
                                (lambda r: r["relative"]["seconds"], "time vs all layers",
                                 "rouge_l")],
    }  # fmt: skip
    written = []
    for file, panels in axes_of.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for ax, (x_of, xlabel, metric) in zip(axes, panels, strict=True):
            for method, results in curves.items():
                ordered = sorted(results, key=x_of)
                ax.plot([x_of(r) for r in ordered], [r["quality"][metric] for r in ordered],
                        marker="o", label=method)  # fmt: skip
            ax.plot([x_of(base)], [base["quality"][metric]], marker="*", markersize=14,
                    linestyle="none", color="black", label="all layers")  # fmt: skip
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric)
            ax.legend()
        fig.suptitle(f"{bench['model']}: quality vs cost ({bench['samples']} samples)")
        fig.tight_layout()
        fig.savefig(folder / file, dpi=120)
        plt.close(fig)
        written.append(file)
    spec = sorted((r for r in settings.values() if r["method"] == "speculative"),
                  key=lambda r: r["draft_layer"])  # fmt: skip
    if spec:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        draft = [r["draft_layer"] for r in spec]
        ax.plot(draft, [r["tokens_per_second"] for r in spec], marker="o", label="tokens/s")
        ax.axhline(base["tokens_per_second"], color="gray", linestyle="--",
                   label="all layers, tokens/s")  # fmt: skip
        ax.set_xlabel("draft exit E")
        ax.set_ylabel("tokens/s")
        twin = ax.twinx()
        twin.plot(draft, [r["acceptance"] for r in spec], marker="s", color="tab:orange",
                  label="acceptance")  # fmt: skip
        twin.set_ylabel("draft acceptance")
        twin.set_ylim(0, 1.05)
        fig.legend(loc="lower right")
        ax.set_title("exact self-speculative decoding")
        fig.tight_layout()
        fig.savefig(folder / PLOTS[2], dpi=120)
        plt.close(fig)
        written.append(PLOTS[2])
    return written
