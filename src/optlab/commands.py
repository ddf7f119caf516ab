"""The commands the CLI, ``optlab rerun`` and recipes run, each declared once.

A command names its inputs and config sections (their fields become its flags) and runs a
job by loading its inputs and calling the Python API, so the CLI has no logic of its own.
"""

from __future__ import annotations

from pathlib import Path

from optlab import api
from optlab.audit.graph import GraphConfig
from optlab.audit.reliability import ReliabilityConfig
from optlab.audit.skeb import SkebConfig
from optlab.core.calibration import Calibration
from optlab.core.job import COMMANDS, Command, Input, Job, Result, Section, register_command
from optlab.embed.contrastive import ContrastiveConfig
from optlab.embed.prompteol import PromptEOLConfig
from optlab.embed.sts import STSEval
from optlab.embed.triplets import TripletData
from optlab.eval.perplexity import PerplexityEval
from optlab.eval.tasks import TaskEval
from optlab.pruning.pruner import WandaConfig
from optlab.quant.quantize import RTNConfig, StorageConfig, TDMPQConfig
from optlab.retraining.perp import PerpConfig
from optlab.unlearning.job import SweepConfig, UnlearnOutput
from optlab.unlearning.losses import LOSSES, offered_methods
from optlab.unlearning.metrics import EvalConfig
from optlab.unlearning.scenarios import UnlearnData
from optlab.unlearning.trainer import TeachConfig, UnlearnConfig

MODEL = Input("model", "MODEL", "a model spec or a run directory")
MODEL_OR_RUN = Input("model", "MODEL_OR_RUN", "a model spec, or a run directory (its model/)")


def _load(job: Job) -> api.LoadedModel:
    return api.load_model(
        job.inputs["model"], dtype=job.dtype, device=job.device, seed=job.load_seed
    )


def _info(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.info(_load(job))


register_command(Command(
    name="info",
    help="describe a model: family, blocks, parameters, linears",
    description="Load MODEL and describe its anatomy: the family, decoder blocks, parameter\n"
    "count, context length and the linear layers of each block (the ones methods act on).",
    inputs=(MODEL,),
    sections=(),
    run=_info,
    out="none",
    examples=("optlab info default",),
))  # fmt: skip


def _eval(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.evaluate(_load(job), job.configs["tasks"], seed=job.seed, out=out, force=force,
                        progress=progress)  # fmt: skip


register_command(Command(
    name="eval",
    help="evaluate a model or run on named tasks",
    description="Evaluate MODEL (or the model of a run directory) on tasks:\n"
    "  ppl:wiki ppl:book ppl:code ppl:FILE.txt   perplexity, non-overlapping windows\n"
    "  mc:sentiment mc:analogy mc:FILE.jsonl     multiple-choice accuracy\n"
    "  unlearn:RUN                               FA, RA, MIA, AUCs, ppl on an unlearn run's\n"
    "                                            data (--limit: samples, default 100)",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("tasks", TaskEval(), "tasks"),),
    run=_eval,
    out="optional",
    examples=("optlab eval default --tasks ppl:wiki --seq-len 512 --limit 40",),
))  # fmt: skip


def _prune(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.prune(_load(job), c["method"], calib=c["calib"], evaluation=c["eval"],
                     seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="prune",
    help="prune a model: magnitude, Wanda or SparseGPT; unstructured or N:M",
    description="Prune every linear layer of the decoder blocks to the same sparsity (embeddings\n"
    "and the LM head stay dense), layer by layer on calibration windows, then measure\n"
    "perplexity on wiki:eval and write the pruned model and its masks to --out.",
    inputs=(MODEL,),
    sections=(
        Section("method", WandaConfig(), "pruning", family="prune"),
        Section("calib", Calibration(), "calibration data"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_prune,
    examples=("optlab prune default --method sparsegpt --pattern 2:4 --out runs/sg24",),
))  # fmt: skip


def _quantize(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.quantize(_load(job), c["allocation"], sensitivity=c["sensitivity"],
                        quantizer=c["quantizer"], storage=c["storage"], calib=c["calib"],
                        evaluation=c["eval"], seed=job.seed, out=out, force=force,
                        progress=progress)  # fmt: skip


register_command(Command(
    name="quantize",
    help="mixed-precision weight-only quantization (CPTQuant) with packed weights",
    description="Score each decoder layer's sensitivity on calibration text, give sensitive "
    "layers more\nbits under a budget, quantize every block linear (RTN or GPTQ) into packed "
    "weights\n(int8, two 4-bit per byte, dense 3/2-bit) with fp16 scales and uint8 zero "
    "points, and\nwrite a run: model/ (reload with `optlab eval RUN`), sensitivity.json, "
    "bits.json,\nsensitivity.png, metrics.json (perplexity before/after, size vs FP16).\n"
    "Allocation (exactly one): --avg-bits B | --max-size MB | --tiers 16,8,4 | --uniform B",
    inputs=(MODEL,),
    sections=(
        Section("sensitivity", TDMPQConfig(), "sensitivity", family="sensitivity",
                selector="--sensitivity"),
        Section("allocation", None, "allocation",
                family="allocation", by_flags=True),
        Section("quantizer", RTNConfig(), "quantizer", family="quantizer",
                selector="--quantizer", shortcuts=(("--gptq", "gptq",
                                                    "GPTQ error compensation (= --quantizer "
                                                    "gptq)"),)),
        Section("storage", StorageConfig(), "storage"),
        Section("calib", api.QUANT_CALIB, "calibration data"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_quantize,
    examples=("optlab quantize default --sensitivity tdmpq --avg-bits 4.5 --out runs/q45",),
))  # fmt: skip


def _retrain(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.retrain(job.inputs["run"], job.configs["method"], evaluation=job.configs["eval"],
                       seed=job.seed, device=job.device, dtype=job.dtype, out=out,
                       force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="retrain",
    help="retrain a pruned run: PERP, full retraining or reconstruction",
    description="Retrain the pruned model of RUN and write a new run. The sparsity mask holds "
    "exactly.\n"
    "  perp          train only --params: bias, norm, head, lora (adapters on every\n"
    "                pruned linear: maskl = W + s(BA*M), scalel = W*(BA), prune, plain)\n"
    "  full          all weights, masks re-applied after every step (the baseline)\n"
    "  reconstruct   block by block, match the dense block's output (PEFT params only)\n"
    "Runs on HF Accelerate: `accelerate launch -m optlab.cli retrain ...` uses many GPUs.",
    inputs=(Input("run", "RUN", "a run directory written by optlab prune"),),
    sections=(
        Section("method", PerpConfig(), "retraining"),
        Section("eval", PerplexityEval(), "evaluation"),
    ),
    run=_retrain,
    examples=("optlab retrain runs/w50 --method perp --steps 200 --out runs/w50-perp",),
))  # fmt: skip


def _unlearn(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    result = api.unlearn(_load(job), c["method"], data=c["data"], evaluation=c["eval"],
                         teach=c["teach"], save=c["output"].save, seed=job.seed, out=out,
                         force=force, progress=progress)  # fmt: skip
    # One loss per step is in metrics.json; a thousand of them do not belong on a terminal.
    return Result({k: v for k, v in result.metrics.items() if k != "losses"}, result.run)


def _unlearn_sweep(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    methods = c["sweep"].methods or (c["method"].method,)
    seeds = c["sweep"].seeds or (job.seed,)
    return api.unlearn_sweep(_load(job), methods, seeds, data=c["data"], config=c["method"],
                             evaluation=c["eval"], teach=c["teach"], out=out, force=force,
                             progress=progress)  # fmt: skip


_UNLEARN_METHODS = "\n".join(f"  {name:<13}{LOSSES.get(name).summary}"
                              for name in offered_methods())  # fmt: skip
_UNLEARN_DATA = (
    "Data: --scenario facts (country questions the model answers), --scenario book (teach\n"
    "Crime and Punishment passages, then unlearn them), or --forget F [--retain R] [--holdout\n"
    'H]: .jsonl of {"question","answer"} (or {"text"}) lines, or .txt documents split by\n'
    "blank lines."
)
_UNLEARN_SECTIONS = (
    Section("data", None, "data", config=UnlearnData),
    Section("method", UnlearnConfig(), "training"),
    Section("teach", TeachConfig(), "teaching (book scenario)"),
    Section("eval", EvalConfig(), "evaluation"),
)

register_command(Command(
    name="unlearn",
    help="unlearn data from a model (GA family) and measure it: FA, RA, MIA, ...",
    description="Unlearn a forget set from MODEL by gradient ascent and its relatives, train "
    "the oracle\n(the same budget on the retain set only) and write the metric suite for the "
    "base and\nthe unlearned model: FA, RA, MIA, AD, JS, distance, mia_loss/zlib/mink/minkpp "
    "AUCs,\nppl (wiki:eval), rougeL/exact_match (documents), harmful_rate (--harm-labels).\n"
    f"{_UNLEARN_METHODS}\n{_UNLEARN_DATA}\n"
    "Sweep: optlab unlearn sweep MODEL --scenario facts --methods ga,npo --seeds 1,2,3\n"
    "       --out DIR   (writes DIR/runs.csv, the input of the reliability audit)\n"
    "Runs on HF Accelerate: `accelerate launch -m optlab.cli unlearn ...` uses many GPUs.",
    inputs=(MODEL,),
    sections=(*_UNLEARN_SECTIONS, Section("output", UnlearnOutput(), "output")),
    run=_unlearn,
    seed=UnlearnConfig().seed,
    examples=("optlab unlearn default --scenario facts --method graddiff --lr 1e-5 "
              "--steps 100 --out runs/facts-gd",),
))  # fmt: skip

register_command(Command(
    name="unlearn sweep",
    help="unlearn with every method x seed; writes runs.csv for the reliability audit",
    description="Run `optlab unlearn` for every --methods x --seeds on the same data (a "
    "scenario is split\nanew per seed; your files stay the same and the seed varies the "
    "training). Per seed\nthe forget set is taught when the scenario asks, the oracle trained "
    "and the base model\nmeasured once; each method starts from a copy. Writes DIR/runs.csv "
    "(run_id,dataset,seed,\nmethod,FA,RA,MIA,AD,JS,distance, then the other metrics and "
    "base_*) and DIR/METHOD-seedS/\n(metrics; its config.yaml replays it as one unlearn run).\n"
    f"{_UNLEARN_METHODS}\n{_UNLEARN_DATA}",
    inputs=(MODEL,),
    sections=(Section("sweep", SweepConfig(), "sweep"), *_UNLEARN_SECTIONS),
    run=_unlearn_sweep,
    seed=UnlearnConfig().seed,
    examples=("optlab unlearn sweep default --scenario facts --methods ga,npo,retain_only "
              "--seeds 1,2,3 --steps 100 --out runs/sweep",),
))  # fmt: skip


RUNS_CSV = Input("runs", "RUNS.csv", "table of unlearning runs (the runs.csv of unlearn sweep)")
GROUPS = {  # two-word commands ("audit skeb") are subcommands of their first word
    "embed": ("sentence embeddings by PromptEOL: encode, evaluate on STS, fine-tune",
              "Sentence embeddings from a causal LM by prompting (PromptEOL, Jiang et al. 2023):\n"
              "the last token's hidden state of 'This sentence : \"[X]\" means in one word:\"'."),
    "audit": ("audit unlearning: metric reliability (UQS), persuasion probes (SKeB)",
              "Did unlearning really forget, and can its numbers be trusted?"),
}  # fmt: skip


def _reliability(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.audit_reliability(job.inputs["runs"], job.configs["audit"], seed=job.seed,
                                 out=out, force=force)  # fmt: skip


register_command(Command(
    name="audit reliability",
    help="do the unlearning metrics agree; which method is best by UQS",
    description="Analyse a table of unlearning runs (the runs.csv of `optlab unlearn sweep`:\n"
    "run_id,dataset,seed,method,FA,RA,MIA,AD,JS,distance) as in arXiv 2605.02206:\n"
    "  1. per (dataset, seed) group, Kendall tau between the method rankings of each pair\n"
    "     of metrics (stable ties), mean over groups and a t-test against 0\n"
    "  2. pooled Kendall tau-b over all runs, per pair and on average\n"
    "  3. Spearman rho of each metric with -distance to the oracle (reliability)\n"
    "  4. weights w = max(rho, 0.01), normalised (full data, or 5-fold --weights cv)\n"
    "  5. the Unified Quality Score per method and the ranking\n"
    "  6. stability: ranking tau under --trials Dirichlet(1) weightings\n"
    "Writes metrics.json, report.md and plots (tau heatmap, rho bars, UQS ranking).",
    inputs=(RUNS_CSV,),
    sections=(Section("audit", ReliabilityConfig(), "reliability"),),
    run=_reliability,
    seed=42,
    examples=("optlab audit reliability runs/sweep/runs.csv --out runs/reliability",),
))  # fmt: skip


def _skeb(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.audit_skeb(_load(job), job.configs["audit"], seed=job.seed, out=out,
                          force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="audit skeb",
    help="persuasion probes: do framed questions bring forgotten facts back",
    description="Ask each forgotten fact plainly and in emotional, logical and authority\n"
    "framings, judge every answer against the domain graph (factual / non-factual /\n"
    "hallucinated per sentence), and report per framing the recall with bootstrap CIs,\n"
    "the relative recovery vs the plain question, and OLS of each behaviour on the\n"
    "prompt's entanglement metrics M1-M9 (Shah & Le, arXiv 2510.25732).\n"
    "Facts: --prompts FILE, else --forgotten RUN_OR_FILE, else MODEL_OR_RUN/forget.jsonl,\n"
    "else the capital of every country (domain countries).",
    inputs=(Input("model", "MODEL_OR_RUN", "the (unlearned) model to audit"),),
    sections=(Section("audit", SkebConfig(), "probes"),),
    run=_skeb,
    examples=("optlab audit skeb runs/unlearned --base default --limit 20 --out runs/skeb",),
))  # fmt: skip


def _graph(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.audit_graph(job.configs["graph"], out=out, force=force)


register_command(Command(
    name="audit graph",
    help="build a domain graph (entity co-occurrence) and save it as JSON",
    description="Build the co-occurrence graph of a domain: the shipped country records\n"
    "(--domain countries) or a corpus with an entity list and an alias map. Node\n"
    "frequency = units naming the entity; edge weight = units naming both. Prints the\n"
    "summary; `optlab audit skeb ... --domain GRAPH.json` uses the saved graph.",
    inputs=(),
    sections=(Section("graph", GraphConfig(), "graph"),),
    run=_graph,
    out="file",
    examples=("optlab audit graph --corpus book.txt --entities names.txt --aliases "
              "aliases.json --unit-regex '^CHAPTER' --out book-graph.json",),
))  # fmt: skip


def _embed_encode(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.embed_encode(_load(job), job.inputs["texts"], job.configs["prompt"], out=out,
                            force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="embed encode",
    help="embed texts (one per line, or a .jsonl text field) into a .npy array",
    description="Embed every text of FILE (.txt: one per line; .jsonl: each line's 'text') by\n"
    "PromptEOL and write the [n, d] float32 array to --out (.npy, rows in the file's order).",
    inputs=(MODEL_OR_RUN, Input("texts", "FILE", "texts to embed: .txt or .jsonl")),
    sections=(Section("prompt", PromptEOLConfig(), "prompt"),),
    run=_embed_encode,
    out="file",
    examples=("optlab embed encode default sentences.txt --out emb.npy",),
))  # fmt: skip


def _embed_eval(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.embed_eval(_load(job), job.configs["sts"], job.configs["prompt"], seed=job.seed,
                          out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="embed eval",
    help="Spearman x100 of PromptEOL similarities on STS sets",
    description="Score PromptEOL embeddings of MODEL on semantic similarity: Spearman x100\n"
    "between cosine similarities and human scores, on the shipped Lee documents (1225 pairs),\n"
    "WordSim-353 and SimLex-999 (a word as the sentence), or your STS-B / SICK .tsv/.csv.",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("sts", STSEval(), "similarity sets"),
              Section("prompt", PromptEOLConfig(), "prompt")),
    run=_embed_eval,
    out="optional",
    examples=("optlab embed eval default --sts lee,wordsim353 --demo opt-2.7b",),
))  # fmt: skip


def _embed_train(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    result = api.embed_train(_load(job), job.configs["train"], job.configs["data"],
                             seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip
    # One loss per step is in metrics.json; hundreds of them do not belong on a terminal.
    return Result({k: v for k, v in result.metrics.items() if k != "losses"}, result.run)


register_command(Command(
    name="embed train",
    help="contrastive fine-tuning (InfoNCE, hard negatives, LoRA) of a PromptEOL embedder",
    description="Fine-tune MODEL as a PromptEOL embedder on (sentence, positive, hard "
    "negative) triplets:\nInfoNCE at temperature 0.05 over every positive and hard negative "
    "of the batch, LoRA\n(r 64, alpha 16, dropout 0.05) on every block linear, lr 5e-4, "
    "sentences cut to 32 tokens.\nThe step with the best dev Spearman is kept; RUN/model/ is "
    "the merged model (plain\ntransformers loads it) with prompt.json; `optlab embed eval "
    "RUN` scores it.\n"
    "Triplets: --pairs builtin (shipped news sentences and words), or a .csv/.tsv/.jsonl in\n"
    "SimCSE's sent0,sent1,hard_neg or SNLI/MNLI's sentence1,sentence2,gold_label layout.\n"
    "Runs on HF Accelerate: `accelerate launch -m optlab.cli embed train ...` gathers the\n"
    "embeddings of all GPUs, so the negatives span the global batch.",
    inputs=(MODEL,),
    sections=(Section("data", TripletData(), "triplets"),
              Section("train", ContrastiveConfig(), "training")),
    run=_embed_train,
    seed=ContrastiveConfig().seed,
    examples=("optlab embed train default --pairs builtin --steps 200 --out runs/emb",
              "optlab embed train default --pairs nli_for_simcse.csv --dev sts-dev.tsv "
              "--batch-size 256 --steps 1000 --out runs/emb-nli"),
))  # fmt: skip


def registered() -> list[Command]:
    """The generated commands, in the order --help lists them."""
    return [COMMANDS.get(name) for name in COMMANDS]
