"""Contrastive PromptEOL tuning: the loss, the gather, training, the triplet files, the demo
set's disjointness from the evaluation sets, and save / reload."""

import json
import math
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from optlab.api import embed_train
from optlab.cli import main
from optlab.core.lora import adapters_of
from optlab.core.models import load_model
from optlab.embed import Embedder
from optlab.embed.contrastive import ContrastiveConfig, gather, info_nce, train_contrastive
from optlab.embed.sts import sts_pairs, sts_spearman
from optlab.embed.triplets import TripletData, builtin_triplets, read_triplets
from optlab.errors import OptlabError

TRIPLETS = [
    ("A man is playing a guitar.", "A man plays music.", "A woman is slicing an onion."),
    ("Two dogs run in a field.", "Dogs are running outside.", "The dogs are asleep."),
    ("A child reads a book.", "A kid is reading.", "A child is swimming."),
    ("The market fell sharply today.", "Stocks dropped today.", "The market rose today."),
    ("Rain is expected tomorrow.", "It will rain tomorrow.", "Tomorrow will be dry."),
    ("She cooked dinner for us.", "She made us dinner.", "She refused to cook."),
    ("The train left on time.", "The train departed punctually.", "The train was late."),
    ("He is fixing his bike.", "He repairs a bicycle.", "He is selling his car."),
]
SIMCSE = "sent0,sent1,hard_neg\n" + "".join(f'"{a}","{p}","{n}"\n' for a, p, n in TRIPLETS)


def direct_info_nce(z1, z2, z3, temperature, offset=0):
    """InfoNCE written out row by row, in float64."""
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    losses = []
    for i, anchor in enumerate(z1):
        logits = [cos(anchor, z) / temperature for z in (*z2, *z3)]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_sum - logits[offset + i])
    return sum(losses) / len(losses)


def test_info_nce_is_the_direct_computation_hard_negatives_included() -> None:
    torch.manual_seed(0)
    z1, z2, z3 = (torch.randn(6, 5, dtype=torch.float64) for _ in range(3))
    loss = info_nce(z1, z2, z3, temperature=0.05).item()
    assert loss == pytest.approx(direct_info_nce(*(z.numpy() for z in (z1, z2, z3)), 0.05))
    # The hard negatives are in the denominator: other z3, another loss.
    assert info_nce(z1, z2, -z3, temperature=0.05).item() != pytest.approx(loss)
    # A process's rows 2..3 of the batch score against the gathered z2, z3 with target 2 + i.
    part = info_nce(z1[2:4], z2, z3, temperature=0.05, offset=2).item()
    assert part == pytest.approx(direct_info_nce(z1[2:4].numpy(), z2.numpy(), z3.numpy(),
                                                 0.05, offset=2))  # fmt: skip


def _gathered_grad(rank: int, world: int, port: int, x, w, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)  # fmt: skip
    try:
        weight = w.clone().requires_grad_(True)
        share = x.shape[1] // world
        rows = slice(rank * share, (rank + 1) * share)
        z = x[:, rows] @ weight  # this process's rows of z1, z2, z3
        accelerator = SimpleNamespace(num_processes=world)
        positives, negatives = gather(accelerator, z[1:], dim=1)
        loss = info_nce(z[0], positives, negatives, 0.05, offset=rows.start)
        loss.backward()
        torch.distributed.all_reduce(weight.grad)  # what DDP does, then / world
        out[rank] = weight.grad / world
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_negatives_give_the_one_process_gradient_of_the_global_batch() -> None:
    torch.manual_seed(1)
    x, w = torch.randn(3, 8, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    weight = w.clone().requires_grad_(True)
    z = x @ weight
    info_nce(z[0], gather(SimpleNamespace(num_processes=1), z[1]), z[2], 0.05).backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_gathered_grad, args=(2, port, x, w, out), nprocs=2, join=True)  # fork can hang
    for rank in range(2):
        torch.testing.assert_close(out[rank], weight.grad)


def test_training_lowers_the_loss_and_keeps_the_best_dev_step() -> None:
    lm = load_model("tiny:llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    dev = [(a, b, s) for a, p, n in TRIPLETS[:4] for b, s in ((p, 1.0), (n, 0.0))]
    config = ContrastiveConfig(steps=6, batch_size=4, rank=8, lr=5e-3, eval_every=2,
                               dropout=0.0)  # fmt: skip
    result = train_contrastive(lm, TRIPLETS, dev, config, progress=False)
    losses = result["losses"]
    assert len(losses) == 6 and result["optimizer_steps"] == 6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    history = result["dev_history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    best = max(history, key=lambda h: h["dev_spearman"])  # the first of equals
    assert result["best_step"] == best["step"]
    assert not adapters_of(lm.model) and not any(p.requires_grad is False
                                                 for p in lm.model.parameters())  # fmt: skip
    # The merged model is the best step's: its dev Spearman is the one recorded then.
    encode = Embedder(lm).encode
    assert sts_spearman(encode, dev) == pytest.approx(best["dev_spearman"])
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("layers." in k and k.endswith("proj.weight") for k in changed)


def test_triplet_files_in_the_layouts_users_have(tmp_path) -> None:
    simcse = tmp_path / "nli_for_simcse.csv"
    simcse.write_text(SIMCSE)
    assert read_triplets(simcse) == TRIPLETS
    rows = [("P1", "E1", "entailment"), ("P1", "N1", "neutral"), ("P1", "C1", "contradiction"),
            ("P1", "E2", "entailment"), ("P2", "E3", "entailment"), ("P3", "C3", "contradiction"),
            ("P1", "X", "-")]  # fmt: skip
    snli = tmp_path / "snli_1.0_train.jsonl"
    snli.write_text("".join(json.dumps({"sentence1": p, "sentence2": h, "gold_label": g,
                                        "pairID": "x"}) + "\n" for p, h, g in rows))  # fmt: skip
    expected = [("P1", "E1", "C1"), ("P1", "E2", "C1")]  # P2, P3 lack one of the two
    assert read_triplets(snli) == expected
    mnli = tmp_path / "train.tsv"  # GLUE's MNLI: more columns, a stray quote
    mnli.write_text("index\tgenre\tsentence1\tsentence2\tgold_label\n" + "".join(
        f'{i}\tfiction\t{p}\t{h}"\t{g}\n' for i, (p, h, g) in enumerate(rows)))  # fmt: skip
    assert read_triplets(mnli) == [("P1", 'E1"', 'C1"'), ("P1", 'E2"', 'C1"')]
    hf = tmp_path / "mnli.jsonl"  # a datasets export: label ids
    ids = {"entailment": 0, "neutral": 1, "contradiction": 2, "-": -1}
    hf.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": ids[g]}) + "\n"
                          for p, h, g in rows))  # fmt: skip
    assert read_triplets(hf) == expected


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.csv", "", "empty"),
        ("p.csv", "a,b,c\n1,2,3\n", "no sent0,sent1,hard_neg or sentence1,sentence2,gold_label"),
        ("p.tsv", "sentence1\tsentence2\tgold_label\nP\tH\tneutral\n", "no premise has both"),
        ("p.csv", "sent0,sent1,hard_neg\nA,,C\n", "row 1 has an empty"),
        ("p.txt", "A\tB\tC\n", "give builtin or a .csv"),
    ],
)
def test_a_bad_pairs_file_is_one_line_and_writes_nothing(tmp_path, capsys, name, text,
                                                         message) -> None:  # fmt: skip
    pairs = tmp_path / name
    pairs.write_text(text)
    code = main(["embed", "train", "tiny:llama", "--pairs", str(pairs), "--steps", "1",
                 "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("optlab: error:"), err
    assert message in err[0] and not (tmp_path / "run").exists()


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_the_builtin_set_is_real_and_disjoint_from_every_evaluation_set() -> None:
    triplets = builtin_triplets()
    assert len(triplets) > 2000 and triplets == builtin_triplets()  # fixed, seeded
    texts = {t.strip().lower() for triplet in triplets for t in triplet}
    evaluation = {t.strip().lower() for name in ("lee", "wordsim353", "simlex999")
                  for a, b, _ in sts_pairs(name) for t in (a, b)}  # fmt: skip
    assert not texts & evaluation
    lee = set().union(*(_grams(a) | _grams(b) for a, b, _ in sts_pairs("lee")))
    assert not any(_grams(t) & lee for t in texts)  # not even an 8-word run of a Lee document
    words = [t for t in triplets if " " not in t[0]]
    assert len(words) > 200 and ("Athens", "Greece") in {t[:2] for t in words}
    train, dev = TripletData(dev_size=50).split()
    assert len(dev) == 100 and not {a for a, _, _ in dev} & {t[0] for t in train}


def test_a_trained_run_reloads_with_identical_embeddings_and_in_plain_transformers(
    tmp_path, capsys
) -> None:
    pairs = tmp_path / "nli.csv"
    pairs.write_text(SIMCSE)
    lm = load_model("tiny:llama")
    run = tmp_path / "run"
    embed_train(lm, ContrastiveConfig(steps=2, batch_size=2, rank=4, eval_every=1),
                TripletData(pairs=str(pairs), dev_size=1), out=run,
                progress=False)  # fmt: skip
    texts = [a for a, _, _ in TRIPLETS]
    trained = Embedder(lm).encode(texts)
    reloaded = Embedder(load_model(str(run)))
    assert reloaded.config.demo is None and (run / "model" / "prompt.json").is_file()
    np.testing.assert_array_equal(reloaded.encode(texts), trained)
    plain = AutoModelForCausalLM.from_pretrained(run / "model")
    ids = lm.tokenizer(reloaded.config.prompt(texts[0]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        state = plain(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(state.numpy(), trained[0], atol=1e-5)
    listing = tmp_path / "t.txt"
    listing.write_text("\n".join(texts))
    assert main(["embed", "encode", str(run), str(listing), "--out", str(tmp_path / "e.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), trained)
    capsys.readouterr()


def test_config_and_data_refuse_bad_values() -> None:
    assert ContrastiveConfig(steps=50).warmup_steps == 5  # the paper's 100, a tenth of 50
    assert ContrastiveConfig(steps=5000).warmup_steps == 100
    with pytest.raises(OptlabError, match="warmup"):
        ContrastiveConfig(steps=10, warmup=10)
    with pytest.raises(OptlabError, match="temperature"):
        ContrastiveConfig(temperature=0)
    with pytest.raises(OptlabError, match="Did you mean 'lee'"):
        TripletData(dev="leee")
