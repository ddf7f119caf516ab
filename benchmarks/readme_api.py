"""The Python API example of the README, run as printed there: python benchmarks/readme_api.py"""

import optlab

lm = optlab.load_model("default")
pruned = optlab.prune(
    lm,
    optlab.WandaConfig(sparsity=0.5),
    calib=optlab.Calibration(n=8, seq_len=512),
    evaluation=optlab.PerplexityEval(limit=8, seq_len=512),
    out="runs/wanda50",
)
print(pruned["sparsity"]["total"], round(pruned["perplexity"]["perplexity"], 2), pruned.run)

quantized = optlab.quantize(
    "default",
    optlab.AvgBitsConfig(avg_bits=4.5),
    sensitivity=optlab.TDMPQConfig(),
    quantizer=optlab.RTNConfig(group_size=64),
    calib=optlab.Calibration(n=8, seq_len=512),
    evaluation=optlab.PerplexityEval(limit=8, seq_len=512),
    out="runs/tdmpq45",
)
print(round(quantized["avg_bits"], 3), quantized["file_mb"], quantized.run)

again = optlab.rerun("runs/wanda50", out="runs/wanda50-again")
print(again["perplexity"] == pruned["perplexity"])
