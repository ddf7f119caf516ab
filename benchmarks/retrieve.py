"""UPRISE benchmark: hold out every cluster in turn; zero-shot / random / BM25 / MiniLM-kNN /
UPRISE accuracy with bootstrap 95% intervals, a cross-model row, scoring throughput and
retrieval latency. Prints Markdown tables for BENCHMARKS.md.

A training example's scores depend only on its own task's pool (its candidates come from
that pool, seeded per example), so every task is scored once and each held-out cluster's
retriever is trained on the scores of the other clusters' tasks: the same numbers
``optlab retrieve run MODEL --hold-out C`` computes per cluster, without scoring each task
four more times. Scores are cached in ``--out`` (a rerun resumes).

    python benchmarks/retrieve.py                                    # default model
    python benchmarks/retrieve.py --pool 16 --candidates 8 --test 30 --other random:llama-135m
    python benchmarks/retrieve.py --model tiny:llama --pool 4 --candidates 2 --test 2  # smoke

The score cache in ``--out`` is not keyed on the settings: give a new ``--out`` when you
change --pool, --candidates, --only or --model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from optlab.core.models import load_model
from optlab.eval.scorer import Scorer
from optlab.retrieve import pipeline
from optlab.retrieve.infer import METHODS
from optlab.retrieve.pipeline import RetrievalEval
from optlab.retrieve.retriever import RetrieverConfig
from optlab.retrieve.scoring import ScoreConfig, score_examples
from optlab.retrieve.tasks import Splits, TaskSplit, split_task


def cell(row: dict, method: str) -> str:
    r = row[method]
    return f"{100 * r['mean']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"


def table(title: str, results: dict[str, dict]) -> None:
    print(f"\n### {title}\n")
    print("| held out | task | n | " + " | ".join(METHODS) + " |")
    print("|---|---|---|" + "---|" * len(METHODS))
    for cluster, res in results.items():
        for task, row in res["tasks"].items():
            print(f"| {cluster} | {task} | {row['n']} | "
                  + " | ".join(cell(row, m) for m in METHODS) + " |")  # fmt: skip
    averages = {m: sum(r["average"][m] for r in results.values()) / len(results) for m in METHODS}
    print("| **average** | (of clusters) | | "
          + " | ".join(f"**{100 * averages[m]:.1f}**" for m in METHODS) + " |")  # fmt: skip
    wins = [c for c, r in results.items() if all(
        r["tasks"][t]["uprise"]["ci95"][0] > max(r["tasks"][t][b]["ci95"][1]
                                                 for b in ("zero", "random"))
        for t in r["tasks"])]  # fmt: skip
    print(f"\nclusters where UPRISE's interval is above zero-shot's and random's on every task: "
          f"{len(wins)} of {len(results)} {wins}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--other", help="a second LLM for the cross-model row")
    parser.add_argument("--pool", type=int, default=16, help="training examples per task")
    parser.add_argument("--test", type=int, default=30, help="test examples per task")
    parser.add_argument("--candidates", type=int, default=8, help="L (the paper's 50)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--clusters", help="comma-separated (default: all)")
    parser.add_argument("--only", help="comma-separated shipped tasks (default: all)")
    parser.add_argument("--out", help="keep the score cache and results here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="optlab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(args.model)
    only = tuple(args.only.split(",")) if args.only else ()
    split = TaskSplit(hold_out="sentiment", only=only, pool_size=args.pool, test_size=args.test)
    tasks = split.all_tasks()
    parts = {n: split_task(t, pool_size=args.pool, test_size=args.test, seed=split.split_seed)
             for n, t in tasks.items()}  # fmt: skip
    clusters = args.clusters.split(",") if args.clusters else list(split.clusters())
    if unknown := sorted(set(clusters) - set(split.clusters())):
        parser.error(f"unknown cluster(s) {', '.join(unknown)}; the clusters: "
                     f"{', '.join(split.clusters())}")  # fmt: skip
    # a cluster held out by every requested run trains no retriever: its pool goes unscored
    pool_all = [e for train, _ in parts.values() for e in train
                if any(e.cluster != c for c in clusters)]  # fmt: skip
    by_task = {n: train for n, (train, _) in parts.items()}
    score = ScoreConfig(candidates=args.candidates, max_new_tokens=args.max_new_tokens)
    print(
        f"model {args.model}; {len(tasks)} tasks; pool {args.pool}/task, test {args.test}"
        f"/task, L={args.candidates}, K=3, epochs {args.epochs}, lr {args.lr}, warmup "
        f"{args.warmup_steps} steps; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    start = time.perf_counter()
    table_all = score_examples(Scorer(lm, batch_size=8), pool_all, by_task, score,
                               cache=work / "scores")  # fmt: skip
    seconds = time.perf_counter() - start
    rate = len(pool_all) / seconds
    print(f"scoring: {len(pool_all)} examples x {args.candidates} candidates in {seconds:.0f} s "
          f"({rate:.2f} examples/s, {rate * args.candidates:.1f} prompts/s; a resume counts "
          "the cached ones too)", flush=True)  # fmt: skip
    retriever = RetrieverConfig(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps)
    evaluation = RetrievalEval(max_new_tokens=args.max_new_tokens)
    main_rows, other_rows = {}, {}
    other = load_model(args.other) if args.other else None
    for cluster in clusters:
        splits = Splits(cluster, [e for e in pool_all if e.cluster != cluster],
                        [e for n, (_, test) in parts.items() if tasks[n].cluster == cluster
                         for e in test])  # fmt: skip
        table_c = {u: r for u, r in table_all.items() if tasks[r["task"]].cluster != cluster}
        t0 = time.perf_counter()
        model, trained = pipeline.train_stage(splits, table_c, retriever, None, device="cpu",
                                              progress=False)  # fmt: skip
        index = pipeline.index_stage(splits, model.prompt_encoder, None)
        print(f"[{cluster}] retriever: {trained['mined_examples']} mined, {trained['steps']} "
              f"steps, val loss {trained['initial_val_loss']:.3f} -> "
              f"{trained['best_val_loss']:.3f} (epoch {trained['best_epoch']}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        for lm_, rows in ((lm, main_rows), (other, other_rows)):
            if lm_ is None:
                continue
            res = pipeline.eval_stage(lm_, splits, evaluation, index=index, seed=0,
                                      input_encoder=model.input_encoder, device="cpu")  # fmt: skip
            rows[cluster] = res
            print(f"[{cluster}] {lm_.spec}: " + ", ".join(
                f"{m} {100 * res['average'][m]:.1f}" for m in METHODS)
                + f"; retrieval {res['retrieval_ms_per_input']:.1f} ms/input; "
                f"{res['eval_seconds']:.0f} s", flush=True)  # fmt: skip
        (work / "results.json").write_text(json.dumps({"main": main_rows, "other": other_rows},
                                                      indent=1))  # fmt: skip
    table(f"{args.model}: accuracy % [95% CI], held-out cluster", main_rows)
    if other_rows:
        table(f"cross-model: retriever trained on {args.model}'s scores, evaluated with "
              f"{args.other}", other_rows)  # fmt: skip
    print(f"\nresults in {work / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
