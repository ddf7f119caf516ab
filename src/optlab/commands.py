"""The commands the CLI, ``optlab rerun`` and recipes run, each declared once.

A command names its inputs and config sections (their fields become its flags) and runs a
job by loading its inputs and calling the Python API, so the CLI has no logic of its own.
"""

from __future__ import annotations

from pathlib import Path

from optlab import api
from optlab.audit.graph import GraphConfig
from optlab.audit.reliability import ReliabilityConfig
from optlab.audit.robustness import RobustnessConfig
from optlab.audit.skeb import SkebConfig
from optlab.core.calibration import Calibration
from optlab.core.job import COMMANDS, Command, Input, Job, Result, Section, register_command
from optlab.early_exit.bench import BenchConfig
from optlab.early_exit.data import CodeDataConfig, CompletionConfig
from optlab.early_exit.generate import GenerateConfig, PromptsConfig
from optlab.early_exit.policy import PolicyConfig
from optlab.early_exit.train import ExitTrainConfig
from optlab.embed.baseline import BaselineConfig
from optlab.embed.contrastive import ContrastiveConfig
from optlab.embed.demos import SelectDemoConfig
from optlab.embed.prompteol import PromptEOLConfig
from optlab.embed.sts import STSEval
from optlab.embed.transfer import TransferEval
from optlab.embed.triplets import TripletData
from optlab.eval.perplexity import PerplexityEval
from optlab.eval.tasks import TaskEval
from optlab.pruning.pruner import WandaConfig
from optlab.quant.gguf_export import ExportConfig
from optlab.quant.quantize import RTNConfig, StorageConfig, TDMPQConfig
from optlab.retraining.perp import PerpConfig
from optlab.retrieve.pipeline import RetrievalEval
from optlab.retrieve.retriever import RetrieverConfig
from optlab.retrieve.scoring import ScoreConfig
from optlab.retrieve.tasks import TaskSplit
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
    "  gen:facts                                 greedy completions (--compile: compiled\n"
    "                                            one-token steps)\n"
    "  unlearn:RUN                               FA, RA, MIA, AUCs, ppl on an unlearn run's\n"
    "                                            data (--limit: samples, default 100)",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("tasks", TaskEval(), "tasks"),),
    run=_eval,
    out="optional",
    examples=("optlab eval default --tasks ppl:wiki --seq-len 512 --limit 40",
              "optlab eval runs/q4 --tasks gen:facts --compile   # compiled packed decoding"),
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
    "Allocation (exactly one): --avg-bits B | --max-size MB | --tiers 16,8,4 | --uniform B\n"
    "--format gguf: the run holds model.gguf instead, each unit at a GGUF type of\n"
    "--gguf-types (Q8_0 8.5, Q5_1 6, Q5_0 5.5, Q4_1 5, Q4_0 4.5 bits per weight, scales\n"
    "included) so that the whole file (metadata, embeddings, norms counted) is at most\n"
    "--max-size MB or --avg-bits B per parameter; layers are rounded by their type, so the\n"
    "perplexity reported is the file's.",
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
    examples=("optlab quantize default --sensitivity tdmpq --avg-bits 4.5 --out runs/q45",
              "optlab quantize default --format gguf --max-size 110 --out runs/g110"),
))  # fmt: skip


def _export(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    if out is None:
        raise api.OptlabError("export writes one file: give it as --out FILE.gguf")
    return api.export(_load(job), job.configs["export"], out=out, force=force,
                      progress=progress)  # fmt: skip


register_command(Command(
    name="export",
    help="write a model or run as one GGUF file (llama.cpp, Ollama, LM Studio)",
    description="Write MODEL_OR_RUN (dense, pruned, or a quantize run) as a GGUF file with\n"
    "llama.cpp's tensor names, hyperparameters, tokenizer and chat template. Float block\n"
    "linears take --type (f16); a quantize run's packed layers keep their width (<= 4 bits:\n"
    "Q4_1 blocks holding the same codes, exact up to the fp16 rounding of -z*s; 8 bits:\n"
    "re-rounded to Q8_0); embeddings and the output head take --embed-type (q8_0); norms\n"
    "and biases F32. Families: llama (SmolLM2), qwen2, gemma3, gpt2, gpt_neox; OPT is\n"
    "refused (llama.cpp has no OPT architecture). An existing --out needs --force, and\n"
    "only a GGUF file is ever replaced. Run the file: llama-cli -m FILE.gguf, or\n"
    "AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME) in transformers.",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("export", ExportConfig(), "export"),),
    run=_export,
    out="file",
    examples=("optlab export default --type q8_0 --out smollm2-q8_0.gguf",
              "optlab export runs/q4 --out smollm2-mixed.gguf"),
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
    "Quantization-robust (SURE, arXiv 2410.16454): --saliency 0.1 --lr 1e-4 trains only the\n"
    "10% of block weight matrices with the largest forget-gradient norm, at a larger lr, so\n"
    "the forgetting outlives 4-bit rounding (`optlab audit robustness RUN` checks it).\n"
    "Quantization-aware (a known deployment format): --quant-aware q4_1 --lr 1e-4 computes\n"
    "the loss on the weights as Q4_1 rounds them (straight-through) and saves them on that\n"
    "grid, so the model's Q4_1 GGUF file forgets what the run forgot.\n"
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
    "embed": ("sentence embeddings by PromptEOL: encode, evaluate, pick a demo, fine-tune",
              "Sentence embeddings from a causal LM by prompting (PromptEOL, Jiang et al. 2023):\n"
              "the last token's hidden state of 'This sentence : \"[X]\" means in one word:\"'."),
    "audit": ("audit unlearning: metric reliability (UQS), persuasion probes (SKeB), "
              "robustness to compression and relearning",
              "Did unlearning really forget, and can its numbers be trusted?"),
    "exit": ("early exit (GREEN-CODE): train exits, a PPO exit policy, generate, benchmark",
             "Energy-aware early exit (GREEN-CODE, arXiv 2501.11006): a token may leave the "
             "model after any allowed layer, read through the model's own final norm and LM "
             "head. `exit train` fine-tunes every exit at once; `exit policy` learns by PPO "
             "when to exit; `exit generate` decodes with exits (policy, confidence, fixed "
             "layer) and a KV cache, or exactly as the full model by self-speculative "
             "decoding; `exit bench` sets quality against executed layers, time and energy."),
    "retrieve": ("UPRISE prompt retrieval: score, train, index, eval, or run the whole chain",
                 "Universal prompt retrieval (UPRISE, Cheng et al. 2023): a frozen LLM scores "
                 "which\ndemonstrations help, a bi-encoder learns to retrieve them, and the "
                 "retriever is tested\non a task cluster it never saw (and with other LLMs)."),
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


def _robustness(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    result = api.audit_robustness(job.inputs["run"], c["audit"], evaluation=c["eval"],
                                  calib=c["calib"], seed=job.seed, out=out, force=force,
                                  progress=progress)  # fmt: skip
    # The terminal gets the ratios; every metric of every model is in metrics.json.
    ratios = {attack: {m: cell["ratio"] for m, cell in row.items()}
              for attack, row in result["recovery"].items()}  # fmt: skip
    return Result({"recovery_metric": result["recovery_metric"], "recovery": ratios},
                  result.run)  # fmt: skip


register_command(Command(
    name="audit robustness",
    help="does quantization, pruning or relearning bring unlearned knowledge back",
    description="Attack the unlearned model of an `optlab unlearn` RUN and, for reference, "
    "the model before\nunlearning (the run's base model, its forget set taught again when "
    "the scenario taught\nit), then measure each: FA or verbatim memorisation (rougeL, "
    "exact_match), RA, perplexity,\nthe LOSS / Min-K% membership AUCs and, for question "
    "forget sets, SKeB recall per framing.\nAttacks (--attacks, comma-separated):\n"
    "  quant:rtn4 quant:gptq4 quant:rtn8   uniform B-bit packed weights (RTN or GPTQ)\n"
    "  gguf:q4_1 gguf:q4_0 gguf:q8_0 ...   the model as a GGUF file of that type holds it\n"
    "                                      (`optlab export --type T`, read back): what a\n"
    "                                      llama.cpp / Ollama user of the model runs\n"
    "  prune:wanda50 prune:sparsegpt50     P% unstructured sparsity (or magnitude)\n"
    "  relearn:N                           fine-tune (LoRA on q/v, --relearn-steps) on N\n"
    "                                      retain examples disjoint from the forget set\n"
    "Recovery per attack = (attacked - unlearned) / (before - unlearned) on every forget "
    "metric,\nwith paired bootstrap 95% intervals; null where unlearning removed no more "
    "than --min-gap.\nZhang et al. (arXiv 2410.16454): 21% of the forgotten knowledge is "
    "kept at full precision,\n83% after 4-bit quantization. Writes metrics.json, report.md "
    "(the table), per_example.json,\nforget_by_attack.png and recovery.png; the run is only "
    "read.",
    inputs=(Input("run", "RUN", "an optlab unlearn run (saved with its model/)"),),
    sections=(Section("audit", RobustnessConfig(), "attacks"),
              Section("eval", EvalConfig(), "evaluation"),
              Section("calib", api.QUANT_CALIB, "calibration (gptq, wanda, sparsegpt)")),
    run=_robustness,
    examples=("optlab audit robustness runs/facts-npo --attacks gguf:q4_1,gguf:q8_0,quant:rtn4,"
              "quant:gptq4,prune:wanda50,relearn:20 --out runs/robust",),
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
    return api.embed_eval(_load(job), job.configs["sts"], job.configs["prompt"],
                          transfer=job.configs["transfer"], baseline=job.configs["baseline"],
                          seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="embed eval",
    help="Spearman x100 of PromptEOL similarities on STS sets",
    description="Score PromptEOL embeddings of MODEL on semantic similarity: Spearman x100\n"
    "between cosine similarities and human scores, on the shipped Lee documents (1225 pairs),\n"
    "WordSim-353 and SimLex-999 (a word as the sentence; NAME:dev / NAME:test halves), or\n"
    "your STS-B / SICK .tsv/.csv. --classify: logistic regression on the frozen embeddings,\n"
    "k-fold accuracy (mean +- std) on sentiment (200 Pang & Lee sentences) or a text,label\n"
    "file. all-MiniLM-L6-v2 is scored beside on the same pairs and folds (--no-minilm: not).",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("sts", STSEval(), "similarity sets"),
              Section("prompt", PromptEOLConfig(), "prompt"),
              Section("transfer", TransferEval(), "transfer classification"),
              Section("baseline", BaselineConfig(), "baseline")),
    run=_embed_eval,
    out="optional",
    examples=("optlab embed eval default --sts lee,wordsim353 --demo opt-2.7b",
              "optlab embed eval default --sts lee:test,wordsim353:test --classify sentiment "
              "--demo runs/demo --out runs/eval"),
))  # fmt: skip


def _embed_select_demo(job: Job, *, out: str | Path | None, force: bool,
                       progress: bool) -> Result:  # fmt: skip
    c = job.configs
    return api.embed_select_demo(_load(job), c["select"], c["prompt"], seed=job.seed, out=out,
                                 force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="embed select-demo",
    help="choose the in-context demonstration by dev-set Spearman",
    description="Score every (sentence -> one word) candidate as PromptEOL's demonstration by\n"
    "the mean Spearman x100 on the dev STS sets (default: the dev halves of Lee and\n"
    "WordSim-353, disjoint from their :test halves), keep the best in --out/prompt.json and\n"
    "list every candidate's score in metrics.json; `--demo RUN` on any embed command uses it.\n"
    "builtin: the paper's six demonstrations and 120 country glosses (countryinfo, MIT).",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("select", SelectDemoConfig(), "demonstration selection"),
              Section("prompt", PromptEOLConfig(), "prompt")),
    run=_embed_select_demo,
    out="required",
    examples=("optlab embed select-demo default --candidates builtin --dev lee:dev,"
              "wordsim353:dev --out runs/demo",
              "optlab embed eval default --sts lee:test,wordsim353:test --demo runs/demo"),
))  # fmt: skip


def _exit_train(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    result = api.exit_train(_load(job), job.configs["train"], data=job.configs["data"],
                            seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip
    # One loss per step is in metrics.json; hundreds of them do not belong on a terminal.
    return Result({k: v for k, v in result.metrics.items() if k != "losses"}, result.run)


register_command(Command(
    name="exit train",
    help="fine-tune every exit of a model at once (GREEN-CODE's multi-exit loss)",
    description="Fine-tune MODEL so that each allowed exit predicts the next token through the\n"
    "model's own final norm and LM head: L = sum_e w_e CE_e over the exits (the final layer\n"
    "last), on packed windows of the train split of --data. --exits auto is the official\n"
    "rule (every other layer from 3 in the first half, then every 4th); --weights geometric\n"
    "gives the first-half exits 0.7, the later ones 0.2, the final layer 0.1 (0.9^k inside\n"
    "a share), uniform 1/(|E|+1). Per exit, top-1 agreement with the final layer, CE and\n"
    "accuracy on held-out windows are measured before and after (metrics.json). Writes a\n"
    "run whose model/ reloads in plain transformers; its config.json holds the exits.\n"
    "Data: code:stdlib (this Python's standard library), code:FOLDER (--extensions), a\n"
    "CodeXGLUE folder (train/dev/test.txt) or .txt, or a .jsonl of {context, target};\n"
    "split 80/10/10 by a hash of each file's relative path.\n"
    "Runs on HF Accelerate: `accelerate launch -m optlab.cli exit train ...` uses many GPUs.",
    inputs=(MODEL,),
    sections=(Section("data", CodeDataConfig(), "data"),
              Section("train", ExitTrainConfig(), "training")),
    run=_exit_train,
    examples=("optlab exit train default --data code:stdlib --exits auto --steps 300 "
              "--context-length 256 --out runs/exits",
              "optlab exit train default --exits 3,5,7 --weights uniform --lora --lr 1e-4 "
              "--out runs/exits-lora"),
))  # fmt: skip


def _exit_generate(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.exit_generate(_load(job), job.configs["generate"], job.configs["prompts"],
                             seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="exit generate",
    help="greedy generation with per-token exits and a KV cache, or exact self-speculation",
    description="Continue each prompt greedily (batch 1), running the decoder blocks one at a "
    "time per\ntoken and asking an exit rule at each allowed exit below the final layer:\n"
    "  none          every layer (the baseline)\n"
    "  fixed:L       every token stops after L blocks\n"
    "  confidence    stop where the exit's max softmax >= --tau (CALM, training-free)\n"
    "  policy        GREEN-CODE's PPO policy (--policy DIR): exit when P(exit) > --tau\n"
    "The exits: the set an `exit train` run stored in its model, else --exits (auto: the\n"
    "official rule). Keys/values of the layers a token skipped: --kv copy fills them from the\n"
    "exit state (CALM); --kv recompute runs the pending tokens through them when a later\n"
    "token goes deeper (the states an uncached model computes). --speculative E drafts\n"
    "--draft-tokens tokens with the first E layers and the shared head and verifies them in\n"
    "one pass of the layers above (the drafts' first E layers are reused): the output is\n"
    "token for token the full model's greedy one. Per sample: tokens, mean executed layers,\n"
    "seconds, tokens/s (and the draft acceptance); --out writes them to a run.",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("generate", GenerateConfig(), "generation"),
              Section("prompts", None, "prompts", config=PromptsConfig)),
    run=_exit_generate,
    out="optional",
    examples=("optlab exit generate default --exit confidence --tau 0.9 --kv recompute "
              "--prompt 'def fib(n):'",
              "optlab exit generate runs/exits --speculative 6 --draft-tokens 4 --in prompts.jsonl",
              "optlab exit generate runs/exits --exit policy --policy runs/policy --tau 0.9 "
              "--prompt 'import os'"),
))  # fmt: skip


def _exit_policy(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    result = api.exit_policy(_load(job), job.configs["policy"], job.configs["data"],
                             seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip
    # One reward per rollout is in metrics.json; a hundred of them do not belong on a terminal.
    return Result({k: v for k, v in result.metrics.items() if k != "rollout_mean_reward"},
                  result.run)  # fmt: skip


register_command(Command(
    name="exit policy",
    help="train the exit policy by PPO (GREEN-CODE): continue or exit at each allowed exit",
    description="Train the per-token exit policy of MODEL_OR_RUN by PPO (stable-baselines3), as\n"
    "GREEN-CODE does: --episodes greedy episodes on the train split of --data (a random\n"
    "sample, a U(0.2, 0.5) context, 15 greedy tokens) give, once, the hidden state of every\n"
    "token at every allowed exit and l* (the first layer agreeing with the final one, or\n"
    "with the true token: --target label); PPO then learns continue/exit from the state.\n"
    "An exit-train run brings its own exits; a plain model takes --exits (default auto).\n"
    "Writes policy.safetensors + policy.json (no pickle; `optlab exit generate --exit policy`\n"
    "reads them) and metrics.json: timings, reward per rollout, and per tau the mean exit\n"
    "layer and the agreement with the final layer on the collected tokens.",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("policy", PolicyConfig(), "policy (PPO)"),
              Section("data", CodeDataConfig(), "code data")),
    run=_exit_policy,
    examples=("optlab exit policy runs/exit-train --timesteps 500000 --out runs/policy",
              "optlab exit policy default --exits 3,5,7,9,11,13,17,21,25 --episodes 64 "
              "--timesteps 20000 --out runs/policy-base"),
))  # fmt: skip


def _exit_bench(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.exit_bench(_load(job), job.configs["bench"], data=job.configs["data"],
                          completion=job.configs["completion"], seed=job.seed, out=out,
                          force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="exit bench",
    help="quality vs executed layers, time and energy of every exit setting; speculation vs E",
    description="GREEN-CODE's evaluation of MODEL_OR_RUN in one process: completion samples of\n"
    "the --split of --data (a --context-fraction 0.2 context, --new-tokens 15 greedy tokens,\n"
    "--samples of them), decoded with all layers (the baseline), the PPO policy of --policy\n"
    "at each of --taus, the confidence rule at each of --taus, each --fixed exit layer, and\n"
    "exact self-speculation at each --speculative draft exit E. Per setting: mean executed\n"
    "layers, exact match, edit similarity, ROUGE-L, chrF and BLEU against the references and\n"
    "relative to all layers, seconds and energy per sample (the meter's backend is named:\n"
    "NVML on a GPU, RAPL where readable, else the proxy: decoder-block runs and LM-head calls\n"
    "as FLOPs), tokens/s, draft acceptance and outputs identical to all layers'. Writes\n"
    "metrics.json, results.csv, results.md, quality_vs_layers.png, quality_vs_cost.png\n"
    "(energy and time) and speculative.png (tokens/s and acceptance vs E).",
    inputs=(MODEL_OR_RUN,),
    sections=(Section("bench", BenchConfig(), "settings"),
              Section("data", CodeDataConfig(), "code data"),
              Section("completion", CompletionConfig(), "completion samples")),
    run=_exit_bench,
    examples=("optlab exit bench runs/exits --data code:stdlib --taus 0.6,0.8,0.9,0.92,0.94 "
              "--policy runs/policy --fixed 8,15,22 --speculative 6,15,24 --samples 200 "
              "--out runs/bench",
              "optlab exit bench default --taus 0.9 --samples 20 --energy proxy --out runs/b"),
))  # fmt: skip


_CLUSTERS = (
    "Clusters (tasks) from shipped data: closed_qa (country_capital, country_region),\n"
    "analogy (analogy_semantic, analogy_syntactic), sentiment (polarity),\n"
    "word_similarity (wordsim353, simlex999), topic (newsgroups); your own with\n"
    "--task-files mc:FILE.jsonl@CLUSTER (context, choices, gold) or\n"
    "gen:FILE.jsonl@CLUSTER (context, target)."
)
_DATA = Section("data", TaskSplit(), "tasks and clusters")
SCORE_RUN = Input("run", "SCORE_RUN", "a run of optlab retrieve score")


def _retrieve_score(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.retrieve_score(_load(job), job.configs["data"], job.configs["score"],
                              seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="retrieve score",
    help="score candidate prompts for every training example with the frozen LLM",
    description="Build the prompt pool (the train splits of every cluster but --hold-out) "
    "and, for each\ntraining example, score --candidates prompts of its own task: multiple "
    "choice by\nloss_gold / sum of option losses (mean answer-token NLL), generation by "
    "1 - metric.\nWrites tasks.json and scores.jsonl. An interrupted scoring resumes when "
    "the same\ncommand runs again; `accelerate launch -m optlab.cli retrieve score ...` "
    f"splits it\nacross processes.\n{_CLUSTERS}",
    inputs=(MODEL,),
    sections=(_DATA, Section("score", ScoreConfig(), "scoring")),
    run=_retrieve_score,
    examples=("optlab retrieve score default --hold-out sentiment --out runs/uprise-score",),
))  # fmt: skip


def _retrieve_train(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    result = api.retrieve_train(job.inputs["run"], job.configs["retriever"], device=job.device,
                                seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip
    return Result({k: v for k, v in result.metrics.items() if k != "losses"}, result.run)


register_command(Command(
    name="retrieve train",
    help="mine positives/negatives from the scores and train the bi-encoder retriever",
    description="Positive: the best-scoring prompt with one-shot accuracy > 0; hard "
    "negatives: the worst\n--hard-negatives; random negatives: prompts of other tasks. "
    "Train an input encoder\nand a prompt encoder (from all-MiniLM-L6-v2) with softmax "
    "cross-entropy over the\nbatch's prompts (in-batch negatives); keep the best epoch by "
    "validation loss. Writes\ninput_encoder/ and prompt_encoder/ (SentenceTransformer(path) "
    "loads each).",
    inputs=(SCORE_RUN,),
    sections=(Section("retriever", RetrieverConfig(), "retriever"),),
    run=_retrieve_train,
    examples=("optlab retrieve train runs/uprise-score --out runs/uprise-train",),
))  # fmt: skip


def _retrieve_index(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.retrieve_index(job.inputs["run"], device=job.device, seed=job.seed, out=out,
                              force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="retrieve index",
    help="encode the prompt pool with the trained prompt encoder into a FAISS index",
    description="Encode every prompt of the pool (question + answer) with the prompt "
    "encoder of TRAIN_RUN\ninto a FAISS inner-product index (IndexFlatIP): index.faiss.",
    inputs=(Input("run", "TRAIN_RUN", "a run of optlab retrieve train"),),
    sections=(),
    run=_retrieve_index,
    examples=("optlab retrieve index runs/uprise-train --out runs/uprise-index",),
))  # fmt: skip


def _retrieve_eval(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    return api.retrieve_eval(job.inputs["run"], job.configs["eval"], device=job.device,
                             seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


_EVAL = (
    "Each test input of the held-out cluster gets --k prompts (uprise: the trained "
    "retriever;\nrandom; bm25; knn: off-the-shelf MiniLM; zero: none), cut to fit the "
    "context and\nreversed so the best sits next to the input (p3 \\n p2 \\n p1 \\n "
    "input); multiple choice\nby the lowest mean answer-token NLL, generation greedy. "
    "Per task: mean and bootstrap\n95% interval."
)
register_command(Command(
    name="retrieve eval",
    help="UPRISE vs zero-shot, random, BM25 and MiniLM-kNN prompts on the held-out cluster",
    description=f"{_EVAL}\n--lm MODEL evaluates with another LLM than the one that "
    "scored (cross-model).",
    inputs=(Input("run", "INDEX_RUN", "a run of optlab retrieve index (or retrieve run)"),),
    sections=(Section("eval", RetrievalEval(), "evaluation"),),
    run=_retrieve_eval,
    out="optional",
    examples=("optlab retrieve eval runs/uprise-index --lm tiny:opt --test-limit 50",),
))  # fmt: skip


def _retrieve_run(job: Job, *, out: str | Path | None, force: bool, progress: bool) -> Result:
    c = job.configs
    return api.retrieve_run(_load(job), c["data"], c["score"], c["retriever"], c["eval"],
                            seed=job.seed, out=out, force=force, progress=progress)  # fmt: skip


register_command(Command(
    name="retrieve run",
    help="the whole UPRISE chain: score, train, index, eval with every baseline",
    description="Score prompts with MODEL on every cluster but --hold-out, train the "
    "retriever, index the\npool and evaluate on the held-out cluster, all in one run "
    f"folder.\n{_EVAL}\n{_CLUSTERS}",
    inputs=(MODEL,),
    sections=(_DATA, Section("score", ScoreConfig(), "scoring"),
              Section("retriever", RetrieverConfig(), "retriever"),
              Section("eval", RetrievalEval(), "evaluation")),
    run=_retrieve_run,
    examples=("optlab retrieve run default --hold-out sentiment --candidates 10 "
              "--score-limit 40 --epochs 2 --out runs/uprise",),
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
