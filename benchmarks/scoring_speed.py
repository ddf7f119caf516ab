"""UPRISE scoring throughput per shipped task (prompts scored a second), optionally against
another optlab source tree in the same process, interleaved task by task so machine drift
hits both alike.

    python benchmarks/scoring_speed.py                             # this tree only
    git worktree add /tmp/before HEAD~1
    python benchmarks/scoring_speed.py --against /tmp/before/src   # before vs this tree

Each measurement scores the first ``--examples`` training examples of a task with
``--candidates`` prompts each (batches of 8, 12 new tokens for generation tasks); the best
of ``--repeats`` is reported. ``--pool`` sets the training examples a task the candidates
are drawn from, ``--tasks`` a subset of the shipped tasks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

MODULES = ("optlab.core.models", "optlab.eval.scorer", "optlab.retrieve.scoring",
           "optlab.retrieve.tasks")  # fmt: skip


def import_tree(root: str) -> dict:
    """optlab's modules from the source tree ``root`` (a fresh import of every one)."""
    for name in [m for m in sys.modules if m == "optlab" or m.startswith("optlab.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        return {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(root)


def prompts_per_second(
    tree: dict, lm, task_name: str, examples: int, candidates: int, pool_size: int
) -> float:
    task = tree["tasks"].shipped_tasks()[task_name]
    pool, _ = tree["tasks"].split_task(task, pool_size=pool_size, test_size=2, seed=0)
    loaded = tree["models"].LoadedModel(lm.model, lm.tokenizer, lm.spec)
    scorer = tree["scorer"].Scorer(loaded, batch_size=8, progress=False)
    config = tree["scoring"].ScoreConfig(candidates=candidates, max_new_tokens=12)
    start = time.perf_counter()
    # the tree's default chunk: how many examples score together is part of what is measured
    tree["scoring"].score_examples(scorer, pool[:examples], {task_name: pool}, config,
                                   progress=False)  # fmt: skip
    drawn = min(candidates, len(pool) - 1)  # a pool smaller than L gives every other prompt
    return examples * drawn / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--against", help="another tree's src/ folder, measured interleaved")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--pool", type=int, help="training examples a task (default: 4 x "
                        "--examples); with --pool 48 --candidates 50 every example draws all "
                        "the others, as retrieve.py at size does")  # fmt: skip
    parser.add_argument("--tasks", help="comma-separated shipped tasks (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (the best of the timed runs is kept)")
    torch.set_num_threads(args.threads)
    here = str(Path(__file__).resolve().parents[1] / "src")
    trees = {"this": import_tree(here)}
    if args.against:
        trees["against"] = import_tree(args.against)
    shipped = list(trees["this"]["tasks"].shipped_tasks())
    names = args.tasks.split(",") if args.tasks else shipped
    if unknown := sorted(set(names) - set(shipped)):
        parser.error(f"unknown task(s) {', '.join(unknown)}; shipped: {', '.join(shipped)}")
    pool_size = args.pool or 4 * args.examples
    if pool_size < args.examples:
        parser.error(f"--pool {pool_size} is smaller than --examples {args.examples}")
    lm = trees["this"]["models"].load_model(args.model)
    best = {which: dict.fromkeys(names, 0.0) for which in trees}
    for _ in range(args.repeats):
        for name in names:
            for which, tree in trees.items():
                rate = prompts_per_second(tree, lm, name, args.examples, args.candidates,
                                          pool_size)  # fmt: skip
                best[which][name] = max(best[which][name], rate)
    columns = list(trees)
    print("| task | " + " | ".join(f"{c} (prompts/s)" for c in columns)
          + (" | ratio |" if args.against else " |"))  # fmt: skip
    print("|---" * (len(columns) + 1 + bool(args.against)) + "|")
    for name in names:
        cells = [f"{best[c][name]:.2f}" for c in columns]
        ratio = [f"{best['this'][name] / best['against'][name]:.2f}x"] if args.against else []
        print(f"| {name} | " + " | ".join(cells + ratio) + " |")
    # Over all tasks: the rate of scoring every task's prompts once, one after another.
    total = {c: len(names) / sum(1 / best[c][n] for n in names) for c in columns}
    cells = [f"**{total[c]:.2f}**" for c in columns]
    ratio = [f"**{total['this'] / total['against']:.2f}x**"] if args.against else []
    print("| all tasks | " + " | ".join(cells + ratio) + " |")


if __name__ == "__main__":
    main()
