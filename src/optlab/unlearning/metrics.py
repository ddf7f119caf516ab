"""The unlearning metric suite: forgetting, utility, privacy and closeness to the oracle.

Per model (all greedy, all deterministic):

- ``FA`` / ``RA``: forget / retain accuracy of generated answers (uqs.md: correct if the
  prediction equals, contains or starts with the gold answer, case-insensitive).
- ``rougeL`` / ``exact_match``: verbatim memorisation of forget documents: the greedy
  continuation of a passage's first tokens against its true continuation.
- ``ppl``: perplexity on ``wiki:eval``.
- ``mia_loss`` / ``mia_zlib`` / ``mia_mink`` / ``mia_minkpp``: AUC of membership scores,
  forget (members) against held-out examples (non-members); 0.5 = no signal.
- ``MIA``: uqs.md's logistic-regression attack (retain = 1, forget = 0): the fraction of
  forget samples it tells apart from retain ones (lower is better, uqs.md's direction).
- ``AD`` / ``JS`` / ``distance``: activation distance, Jensen-Shannon divergence and
  parameter distance to the oracle (a model trained on the retain set only).
- ``harmful_rate``: share of generations a MiniLM + logistic-regression classifier calls
  harmful (when labelled texts are given).

>>> suite = EvalConfig()
>>> metrics = evaluate_model(lm, forget, retain, holdout, suite, oracle=oracle)
>>> metrics["FA"], metrics["mia_loss"]
(0.12, 0.55)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from optlab.core.anatomy import Anatomy
from optlab.core.config import configurable, option, require, require_finite, require_positive
from optlab.core.decode import greedy
from optlab.core.models import LoadedModel
from optlab.errors import OptlabError
from optlab.eval.perplexity import wiki_perplexity
from optlab.eval.scorer import Scorer, window_length
from optlab.unlearning.data import Batch, Example, encode
from optlab.unlearning.losses import token_logprobs

if TYPE_CHECKING:
    from optlab.unlearning.harm import HarmClassifier

JS_MODES = ("aligned", "sorted")


@configurable("unlearn-eval")
@dataclass(frozen=True)
class EvalConfig:
    """Sizes of the evaluation; the defaults are uqs.md's (50 new tokens, 100 samples)."""

    max_new_tokens: int = option(50, "greedy answer tokens")
    samples: int = option(100, "retain items for RA / MIA, forget items for AD / JS / MIA")
    mink_ratio: float = option(0.2, "Min-K% attacks: the share of lowest token log-probs")
    js_topk: int = option(1000, "JS: top-k next-token probabilities compared")
    js_mode: str = option("aligned", "JS over token-id-aligned top-k or sorted top-k",
                          flag="--js", choices=JS_MODES)  # fmt: skip
    prefix_tokens: int = option(32, "memorisation: passage tokens given")
    continuation_tokens: int = option(32, "memorisation: continuation tokens compared")
    ppl_seq_len: int = option(512, "perplexity window", flag="--eval-seq-len")
    ppl_limit: int | None = option(20, "wiki:eval perplexity windows", flag="--eval-limit")
    batch_size: int = option(8, "sequences per forward pass", flag="--eval-batch-size")

    def __post_init__(self) -> None:
        require_positive(self, "max_new_tokens", "samples", "js_topk", "prefix_tokens",
                         "continuation_tokens", "ppl_seq_len", "ppl_limit",
                         "batch_size")  # fmt: skip
        require_finite(self, "mink_ratio")
        require(self.js_mode in JS_MODES, f"js_mode must be one of {', '.join(JS_MODES)}, got "
                f"{self.js_mode!r}")  # fmt: skip
        require(0 < self.mink_ratio <= 1, f"mink_ratio must be in (0, 1], got {self.mink_ratio}")

    def window(self, lm: LoadedModel) -> int:
        """The perplexity window, checked against the model (the default 512 is capped at a
        shorter context, an explicit longer one refused): asked right after loading, so a
        bad ``--eval-seq-len`` fails before any training."""
        return window_length(lm.model, self.ppl_seq_len, what="--eval-seq-len",
                             default=EvalConfig.ppl_seq_len)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Forgetting: answers and verbatim memorisation


def answer_correct(prediction: str, gold: str) -> bool:
    """uqs.md's rule: equals, contains or starts with the gold answer, case-insensitive
    (equality and prefix are special cases of containment; all three are named for clarity)."""
    pred, gold = prediction.strip().lower(), gold.strip().lower()
    return pred == gold or pred.startswith(gold) or gold in pred


def answers(scorer: Scorer, examples: Sequence[Example], max_new_tokens: int) -> list[str]:
    """Greedy answers to each question: the first non-blank line (models often start their
    answer on a new line), cut before any ``###`` marker."""
    prompts = [e.prompt for e in examples]
    texts = scorer.generate(prompts, until=["###"], max_new_tokens=max_new_tokens)
    return [(text.strip().splitlines() or [""])[0].strip() for text in texts]


def qa_hits(scorer: Scorer, examples: Sequence[Example], max_new_tokens: int = 50) -> list[float]:
    """1.0 or 0.0 per question (documents skipped): answered correctly by greedy generation."""
    questions = [e for e in examples if e.question is not None]
    if not questions:
        return []
    predictions = answers(scorer, questions, max_new_tokens)
    return [float(answer_correct(p, e.answer)) for p, e in zip(predictions, questions,
                                                                strict=True)]  # fmt: skip


def qa_accuracy(scorer: Scorer, examples: Sequence[Example], max_new_tokens: int = 50) -> float:
    """Share of questions answered correctly by greedy generation."""
    return _mean(qa_hits(scorer, examples, max_new_tokens))


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words (longest common subsequence)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    lcs = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, lcs[j] = lcs[j], previous + 1 if x == y else max(lcs[j], lcs[j - 1])
    common = lcs[-1]
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def memorisation(
    lm: LoadedModel, documents: Sequence[Example], prefix: int = 32, continuation: int = 32
) -> dict[str, float]:
    """Greedy continuation of the first ``prefix`` tokens of each document against the next
    ``continuation`` true tokens: ``exact_match`` (share of positions with the same token) and
    ``rougeL`` (of the decoded texts), averaged over documents long enough to test."""
    return _memorisation_means(memorisation_scores(lm, documents, prefix, continuation))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _memorisation_means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {"rougeL": _mean(scores["rougeL"]), "exact_match": _mean(scores["exact_match"]),
            "memorisation_n": len(scores["rougeL"])}  # fmt: skip


@torch.no_grad()
def memorisation_scores(
    lm: LoadedModel, documents: Sequence[Example], prefix: int = 32, continuation: int = 32
) -> dict[str, list[float]]:
    """:func:`memorisation` per document long enough to test (the others are skipped)."""
    tok, model = lm.tokenizer, lm.model
    pairs = []
    for doc in documents:
        ids = tok(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= prefix + continuation:
            pairs.append((ids[:prefix], ids[prefix : prefix + continuation]))
    matches: list[float] = []
    rouges: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        out = greedy(model, [p for p, _ in chunk], continuation, pad_id=pad, eos=())
        for row, (_, truth) in zip(out, chunk, strict=True):
            matches.append(sum(a == b for a, b in zip(row, truth, strict=False)) / len(truth))
            rouges.append(rouge_l(tok.decode(row), tok.decode(truth)))
    return {"rougeL": rouges, "exact_match": matches}


# ---------------------------------------------------------------------------------------------
# Privacy: membership inference


@torch.no_grad()
def membership_scores(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    ratio: float = 0.2,
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Per example, higher = more likely a training member (scored on answer tokens):
    ``loss`` mean log-likelihood; ``zlib`` that divided by the zlib-compressed byte length;
    ``mink`` mean of the lowest ``ratio`` token log-probs; ``minkpp`` the same on
    (log p - μ) / σ with μ, σ the mean and std of log p under the model's own distribution."""
    scores: dict[str, list[float]] = {"loss": [], "zlib": [], "mink": [], "minkpp": []}
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = encode(tokenizer, chunk).to(device)
        logits = model(**batch.inputs(), use_cache=False).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1)
        probs = logprobs.exp()
        mu = (probs * logprobs).sum(-1)
        sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp(min=1e-12).sqrt()
        picked, counted = token_logprobs(model, batch)
        for i, example in enumerate(chunk):
            keep = counted[i]
            lp = picked[i][keep]
            normed = ((lp - mu[i][keep]) / sigma[i][keep]).cpu().numpy()
            lp = lp.cpu().numpy()
            k = max(1, int(len(lp) * ratio))
            scores["loss"].append(float(lp.mean()))
            scores["zlib"].append(float(lp.mean()) / len(zlib.compress(example.text.encode())))
            scores["mink"].append(float(np.sort(lp)[:k].mean()))
            scores["minkpp"].append(float(np.sort(normed)[:k].mean()))
    return {name: np.array(values) for name, values in scores.items()}


def mia_aucs(
    model: nn.Module,
    tokenizer: Any,
    members: Sequence[Example],
    nonmembers: Sequence[Example],
    ratio: float = 0.2,
) -> dict[str, float]:
    """ROC AUC of each score separating members (forget) from non-members (held out)."""
    from sklearn.metrics import roc_auc_score

    if not members or not nonmembers:
        return {f"mia_{name}": math.nan for name in ("loss", "zlib", "mink", "minkpp")}
    inside = membership_scores(model, tokenizer, members, ratio)
    outside = membership_scores(model, tokenizer, nonmembers, ratio)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return {f"mia_{name}": float(roc_auc_score(labels, np.r_[inside[name], outside[name]]))
            for name in inside}  # fmt: skip


def probe_text(example: Example) -> str:
    """What AD, JS and the LR attack feed the model: the question prompt, or the document."""
    return example.prompt if example.question is not None else example.answer


@torch.no_grad()
def last_position_probs(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 8
) -> torch.Tensor:
    """Next-token distribution after each probe text, (N, vocab), fp32 on the CPU."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(examples), batch_size):
        batch = _probe_batch(tokenizer, examples[start : start + batch_size]).to(device)
        logits = model(**batch.inputs(), use_cache=False).logits.float()
        last = batch.attention_mask.sum(1) - 1
        rows.append(torch.softmax(logits[torch.arange(len(last)), last], -1).cpu())
    return torch.cat(rows)


def _probe_batch(tokenizer: Any, examples: Sequence[Example]) -> Batch:
    return encode(tokenizer, [Example(probe_text(e)) for e in examples])


def mia_logistic(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Example],
    retain: Sequence[Example],
    samples: int = 100,
) -> float:
    """uqs.md's attack: features [max p, -entropy, top1 - top2] at the last probe position;
    retain = 1, forget = 0; StandardScaler + LogisticRegression(C=1), 5-fold
    ``cross_val_predict``; returns the share of forget samples predicted 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    forget, retain = list(forget)[:samples], list(retain)[:samples]
    folds = min(5, len(forget), len(retain))
    if folds < 2:
        return math.nan
    features = mia_features(last_position_probs(model, tokenizer, [*retain, *forget]))
    labels = np.r_[np.ones(len(retain)), np.zeros(len(forget))]
    attack = make_pipeline(StandardScaler(), LogisticRegression(C=1.0))
    predicted = cross_val_predict(attack, features, labels, cv=folds)
    return float((predicted[len(retain) :] == 0).mean())


def mia_features(probs: torch.Tensor) -> np.ndarray:
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    return torch.stack([top2[:, 0], -entropy, top2[:, 0] - top2[:, 1]], 1).numpy()


# ---------------------------------------------------------------------------------------------
# Closeness to the oracle


@torch.no_grad()
def activation_distance(
    model: nn.Module,
    oracle: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    batch_size: int = 8,
) -> float:
    """Mean over examples of the token-averaged L2 distance between the outputs of decoder
    block -2 of the two models (real tokens only)."""
    device = next(model.parameters()).device
    distances = []
    for start in range(0, len(examples), batch_size):
        batch = _probe_batch(tokenizer, examples[start : start + batch_size]).to(device)
        a, b = _block_output(model, batch, -2), _block_output(oracle, batch, -2)
        mask = batch.attention_mask.float()
        per_token = (a - b).norm(dim=-1) * mask
        distances.extend((per_token.sum(1) / mask.sum(1)).tolist())
    return float(np.mean(distances))


def _block_output(model: nn.Module, batch: Batch, index: int) -> torch.Tensor:
    captured = []
    block = Anatomy.of(model).blocks[index]
    handle = block.register_forward_hook(
        lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).float())
    )
    try:
        model(**batch.inputs(), use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def js_divergence(
    p: torch.Tensor, q: torch.Tensor, topk: int = 1000, mode: str = "aligned"
) -> float:
    """Squared scipy ``jensenshannon`` (natural log) between two next-token distributions,
    restricted to top-k probabilities and renormalised. ``aligned`` compares the same token
    ids over the union of both top-k sets; ``sorted`` compares each model's own top-k
    probabilities sorted (the reference code: not aligned by token id)."""
    k = min(topk, p.numel())
    if mode == "sorted":
        a, b = p.topk(k).values.double().numpy(), q.topk(k).values.double().numpy()
    elif mode == "aligned":
        ids = torch.unique(torch.cat([p.topk(k).indices, q.topk(k).indices]))
        a, b = p[ids].double().numpy(), q[ids].double().numpy()
    else:
        raise OptlabError(f"js mode must be one of {', '.join(JS_MODES)}, got {mode!r}")
    return float(jensenshannon(a / a.sum(), b / b.sum()) ** 2)


def mean_js(
    model: nn.Module,
    oracle: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    topk: int = 1000,
    mode: str = "aligned",
) -> float:
    p = last_position_probs(model, tokenizer, examples)
    q = last_position_probs(oracle, tokenizer, examples)
    return float(np.mean([js_divergence(a, b, topk, mode) for a, b in zip(p, q, strict=True)]))


@torch.no_grad()
def parameter_distance(
    model: nn.Module, oracle: nn.Module, names: Sequence[str] | None = None
) -> float:
    """Mean over the named tensors (default: all) of ||θ - θ*||₂ between model and oracle."""
    mine, theirs = dict(model.named_parameters()), dict(oracle.named_parameters())
    names = list(names) if names is not None else list(mine)
    missing = [n for n in names if n not in mine or n not in theirs]
    if missing:
        raise OptlabError(f"parameters missing in one of the models: {missing[:3]}")
    norms = [(mine[n].float() - theirs[n].float().to(mine[n].device)).norm().item() for n in names]
    return float(np.mean(norms))


# ---------------------------------------------------------------------------------------------
# The suite


def evaluate_model(
    lm: LoadedModel,
    forget: Sequence[Example],
    retain: Sequence[Example],
    holdout: Sequence[Example],
    config: EvalConfig | None = None,
    *,
    oracle: nn.Module | None = None,
    trained: Sequence[str] | None = None,
    harm: HarmClassifier | None = None,
    perplexity: bool = True,
    per_example: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric of the suite for one model (oracle metrics only when ``oracle`` is given;
    memorisation only for document forget sets; FA / RA only for question sets). With
    ``per_example``, ``metrics["per_example"]`` holds the values FA, RA, rougeL and
    exact_match average (one per question or document, in the sets' order), for paired
    bootstrap intervals across models."""
    config = config or EvalConfig()
    model, tok = lm.model, lm.tokenizer
    scorer = Scorer(lm, batch_size=config.batch_size, progress=progress)
    sample = list(forget)[: config.samples]
    retain_sample = list(retain)[: config.samples]
    values: dict[str, list[float]] = {
        "FA": qa_hits(scorer, forget, config.max_new_tokens),
        "RA": qa_hits(scorer, retain_sample, config.max_new_tokens),
    }
    metrics: dict[str, Any] = {
        "FA": _mean(values["FA"]),
        "RA": _mean(values["RA"]),
        "MIA": mia_logistic(model, tok, sample, retain_sample, config.samples),
    }
    if any(e.question is None for e in forget):
        docs = [e for e in forget if e.question is None]
        values |= memorisation_scores(lm, docs, config.prefix_tokens, config.continuation_tokens)
        metrics |= _memorisation_means(values)  # type: ignore[arg-type]
    metrics |= mia_aucs(model, tok, sample, list(holdout)[: config.samples], config.mink_ratio)
    if oracle is not None:
        metrics["AD"] = activation_distance(model, oracle, tok, sample)
        metrics["JS"] = mean_js(model, oracle, tok, sample, config.js_topk, config.js_mode)
        metrics["distance"] = parameter_distance(model, oracle, trained)
    if harm is not None:
        questions = [e for e in holdout if e.question is not None] or sample
        metrics["harmful_rate"] = harm.rate(answers(scorer, questions, config.max_new_tokens))
    if perplexity:
        metrics["ppl"] = wiki_perplexity(
            lm, config.window(lm), config.ppl_limit, progress, what="--eval-seq-len"
        )["perplexity"]
    if per_example:
        metrics["per_example"] = values
    return metrics
