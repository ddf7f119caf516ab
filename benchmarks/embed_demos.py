"""Write the news-document demonstration candidates that BENCHMARKS.md scores with
`optlab embed select-demo`: documents of gensim's Lee *background* corpus (other ABC news
documents than the 50 scored Lee documents), each with a topic word chosen by hand before any
was scored. `--sentences N` keeps each document's first N sentences (0: the whole document).

    python benchmarks/embed_demos.py --set two --sentences 2 --out news2.tsv
    python benchmarks/embed_demos.py --set whole --sentences 0 --out whole.tsv
    optlab embed select-demo default --candidates whole.tsv --out runs/demo-whole
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optlab.core import data
from optlab.embed.triplets import _sentences

# background document index -> topic word
SETS = {
    "two": {
        5: "Asylum",
        30: "HIV",
        55: "Cricket",
        80: "Zimbabwe",
        105: "Detention",
        130: "Suharto",
        155: "Insolvency",
        180: "Refugees",
        205: "Gambling",
        230: "Canyoning",
        255: "Storms",
        280: "Election",
    },
    # the six of "two" that scored best on Lee dev as two sentences, now whole documents
    "whole": {
        30: "HIV",
        180: "Refugees",
        155: "Insolvency",
        55: "Cricket",
        230: "Canyoning",
        5: "Asylum",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="whole")
    parser.add_argument("--sentences", type=int, default=0, help="first N sentences; 0: all")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    documents = data.lee_background()
    lines = ["sentence\tword"]
    for index, word in SETS[args.set].items():
        text = " ".join(_sentences(documents[index])[: args.sentences or None])
        lines.append(f"{text}\t{word}")  # no tab or newline in a sentence; quotes kept as is
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(SETS[args.set])} candidates -> {args.out}")


if __name__ == "__main__":
    main()
