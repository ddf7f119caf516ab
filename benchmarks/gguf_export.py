"""GGUF export of the default model: file bytes, and the perplexity of each file read back by
transformers' GGUF reader beside optlab's own figure for the same weights (the model with
every tensor set to what the file stores, before writing).

    PYTHONPATH=src python benchmarks/gguf_export.py --types q8_0,q4_1 --eval-limit 8 \\
        --out /tmp/gguf-bench [--runs runs/g110]

``--runs``: quantize runs written with ``--format gguf``; their ``model.gguf`` is read back the
same way and compared with the run's ``perplexity_after``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optlab.core.models import load_model
from optlab.eval.perplexity import PerplexityEval
from optlab.quant.gguf_export import GGUFPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--types", default="q8_0,q4_1")
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default="")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    evaluation = PerplexityEval(limit=args.eval_limit, seq_len=args.seq_len)
    rows = []
    for qtype in args.types.split(","):
        lm = load_model(args.model)
        plan = GGUFPlan(lm, weight_type=qtype)
        plan.encode(apply=True, progress=False)  # lm now holds the file's weights
        ours = evaluation.measure(lm, args.seq_len, progress=False)["perplexity"]
        path = args.out / f"{args.model}-{qtype}.gguf"
        path.unlink(missing_ok=True)
        summary = plan.write(path, progress=False)
        theirs = evaluation.measure(load_model(str(path)), args.seq_len, False)["perplexity"]
        rows.append({"file": str(path), "type": qtype, "file_bytes": summary["file_bytes"],
                     "optlab_ppl": ours, "transformers_ppl": theirs})  # fmt: skip
    for run in filter(None, args.runs.split(",")):
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        theirs = evaluation.measure(load_model(run), args.seq_len, False)["perplexity"]
        rows.append({"file": f"{run}/model.gguf", "type": "allocated",
                     "file_bytes": metrics["file_bytes"],
                     "optlab_ppl": metrics["perplexity_after"]["perplexity"],
                     "transformers_ppl": theirs})  # fmt: skip
    print("| file | type | bytes | optlab ppl | transformers ppl | rel. diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = abs(r["transformers_ppl"] / r["optlab_ppl"] - 1)
        print(f"| {r['file']} | {r['type']} | {r['file_bytes']} | {r['optlab_ppl']:.3f} | "
              f"{r['transformers_ppl']:.3f} | {diff:.2e} |")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
