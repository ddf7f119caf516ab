"""Code-completion data: the by-file split, the sources, the sample cut, packing."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from optlab.core.models import load_model
from optlab.early_exit.data import (
    CodeDataConfig,
    CodeItem,
    CompletionConfig,
    code_items,
    completion_samples,
    packed_windows,
    split_of,
)
from optlab.errors import OptlabError


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny:llama").tokenizer


def test_split_of_is_the_documented_hash_rule() -> None:
    for key in ("json/decoder.py", "a.py", "pkg/deep/module.java"):
        digest = hashlib.sha256(("optlab-code-split:" + key).encode()).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64
        expected = "train" if position < 0.8 else "dev" if position < 0.9 else "test"
        assert split_of(key) == expected


def test_stdlib_splits_are_deterministic_disjoint_by_file_and_cover_everything() -> None:
    splits = {s: code_items("code:stdlib", s) for s in ("train", "dev", "test", "all")}
    names = {s: [i.name for i in items] for s, items in splits.items()}
    assert names["train"] == [i.name for i in code_items("code:stdlib", "train")]
    parts = [set(names[s]) for s in ("train", "dev", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(names["all"])
    # Roughly 80 / 10 / 10 by file; test suites and generated modules are left out.
    total = len(names["all"])
    assert 0.7 < len(names["train"]) / total < 0.9 and len(names["test"]) > 20
    assert "json/decoder.py" in names["all"]
    assert not any(n.startswith(("test/", "_sysconfigdata")) for n in names["all"])


def test_folder_split_by_relative_path_and_extensions(tmp_path) -> None:
    for i in range(40):
        (tmp_path / f"pkg{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"pkg{i % 3}" / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "notes.md").write_text("# not code\n")
    items = code_items(f"code:{tmp_path}", "all", (".py",))
    assert len(items) == 40 and all(i.name.endswith(".py") for i in items)
    for split in ("train", "dev", "test"):
        for item in code_items(f"code:{tmp_path}", split, (".py",)):
            assert split_of(item.name) == split
    assert [i.name for i in code_items(f"code:{tmp_path}", "all", (".md",))] == ["notes.md"]


def test_codexglue_lines_and_folders(tmp_path) -> None:
    line = "<s> import os <EOL> def f ( ) : <EOL> return <NUM_LIT> </s>"
    (tmp_path / "train.txt").write_text(line + "\n" + line.replace("os", "sys") + "\n")
    (tmp_path / "dev.txt").write_text(line.replace("os", "re") + "\n")
    (tmp_path / "test.txt").write_text(line.replace("os", "io") + "\n\n")
    test = code_items(f"code:{tmp_path}", "test")
    assert [i.text for i in test] == ["import io <EOL> def f ( ) : <EOL> return <NUM_LIT>"]
    assert len(code_items(f"code:{tmp_path}", "train")) == 2
    assert len(code_items(f"code:{tmp_path}", "all")) == 4
    single = code_items(f"code:{tmp_path / 'train.txt'}", "all")
    assert [i.name for i in single] == ["train.txt:1", "train.txt:2"]


def test_jsonl_pairs_keep_their_split_point(tmp_path, tokenizer) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"context": "def add(a, b):\n", "target": "    return a + b"},
            {"input": "<s> import os <EOL> os .", "gt": "path"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = code_items(f"code:{path}", "all")
    assert items[0] == CodeItem("pairs.jsonl:1", "def add(a, b):\n    return a + b",
                                "def add(a, b):\n")  # fmt: skip
    assert items[1].context == "import os <EOL> os ."
    samples = completion_samples(items, tokenizer, CompletionConfig())
    assert samples[0].target == "    return a + b"
    assert samples[0].context_ids.tolist() == tokenizer("def add(a, b):\n")["input_ids"]


def test_samples_cut_the_first_fraction_of_tokens_then_the_next_ones(tokenizer) -> None:
    text = "".join(f"value_{i} = compute({i}, {i * i})\n" for i in range(60))
    ids = tokenizer(text)["input_ids"]
    (sample,) = completion_samples([CodeItem("f.py", text)], tokenizer, CompletionConfig())
    cut = int(len(ids) * 0.2)
    assert sample.context_ids.tolist() == ids[:cut]
    assert sample.target_ids.tolist() == ids[cut : cut + 15]
    assert sample.target == tokenizer.decode(ids[cut : cut + 15])
    (capped,) = completion_samples([CodeItem("f.py", text)], tokenizer,
                                   CompletionConfig(max_context=7, new_tokens=3))  # fmt: skip
    assert capped.context_ids.tolist() == ids[:7] and capped.target_ids.tolist() == ids[7:10]


def test_episode_fractions_are_seeded_uniform_draws(tokenizer) -> None:
    items = [CodeItem(f"f{i}.py", "x = 1\n" * (50 + i)) for i in range(30)]
    config = CompletionConfig(context_fraction=(0.2, 0.5), samples=10, seed=3)
    first = completion_samples(items, tokenizer, config)
    again = completion_samples(items, tokenizer, config)
    assert [s.name for s in first] == [s.name for s in again] and len(first) == 10
    assert all(torch.equal(a.context_ids, b.context_ids) for a, b in zip(first, again, strict=True))
    shares = [len(s.context_ids) / len(tokenizer(items[int(s.name[1:-3])].text)["input_ids"])
              for s in first]  # fmt: skip
    assert all(0.17 < share <= 0.5 for share in shares) and max(shares) - min(shares) > 0.05
    other = completion_samples(items, tokenizer, CompletionConfig((0.2, 0.5), samples=10, seed=4))
    assert [s.name for s in other] != [s.name for s in first]


def test_packed_windows_join_documents_with_eos(tokenizer) -> None:
    texts = ["a = 1\n", "b = 2\n" * 20, "c = 3\n" * 20]
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = packed_windows(texts, tokenizer, 8)
    assert windows.shape == (len(stream) // 8, 8)
    assert windows.flatten().tolist() == stream[: windows.numel()]
    assert packed_windows(texts, tokenizer, 8, limit=2).tolist() == windows[:2].tolist()


@pytest.mark.parametrize(
    ("spec", "message"),
    [("code:EMPTY", "holds no code"), ("code:/no/such/dir", "no such file or folder"),
     ("wiki", "give code:stdlib"), ("code:", "give code:stdlib")],
)  # fmt: skip
def test_bad_data_specs_are_one_clear_line(tmp_path, spec, message) -> None:
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "readme.md").write_text("no code here")
    with pytest.raises(OptlabError, match=message) as err:
        code_items(spec.replace("EMPTY", str(tmp_path / "EMPTY")), "train", (".py",))
    assert "\n" not in str(err.value)


def test_config_validation() -> None:
    with pytest.raises(OptlabError, match="context-fraction"):
        CompletionConfig(context_fraction=(0.5, 0.2))
    with pytest.raises(OptlabError, match="context-fraction"):
        CompletionConfig(context_fraction=(1.2,))
    with pytest.raises(OptlabError, match="--data"):
        CodeDataConfig(data="stdlib")
