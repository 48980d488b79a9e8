"""Text sources: the built-in wiki split, local files, calibration windows."""

import importlib.util

import pytest
import torch

from dbquant.errors import DbquantError
from dbquant.eval import data
from dbquant.eval.data import calibration_batches, load_text


@pytest.fixture(scope="module")
def wiki():
    return {split: load_text("wiki", split) for split in ("calibration", "eval")}


def test_wiki_split_sizes(wiki):
    # docs/PROTOCOLS.md: 106 articles, ~3.1 MB; every 5th (i % 5 == 4) is eval.
    assert len(wiki["calibration"]) == 85
    assert len(wiki["eval"]) == 21
    total = sum(len(a) for split in wiki.values() for a in split)
    assert 3.0e6 < total < 3.2e6


def test_wiki_split_is_disjoint_and_in_dump_order(wiki):
    assert not set(wiki["calibration"]) & set(wiki["eval"])
    articles = data.wiki_articles()
    assert wiki["eval"] == articles[4::5]


def test_wiki_articles_are_clean(wiki):
    for article in wiki["calibration"] + wiki["eval"]:
        assert "''" not in article  # italic/bold quote runs removed
        assert len(article) >= 200
        assert article == article.strip()
        assert not article.lower().startswith("#redirect")


def test_local_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not text")
    assert load_text(str(tmp_path / "a.txt"), "calibration") == ["first document"]
    # The split only applies to wiki: a local source gives everything for both.
    for split in ("calibration", "eval"):
        assert load_text(str(tmp_path), split) == ["first document", "second document"]


@pytest.mark.parametrize("source", ["no-such-source", "/no/such/file.txt", "hf:only-a-name", "hf:a:b:c:d:e"])
def test_bad_source(source):
    with pytest.raises(DbquantError):
        load_text(source, "calibration")


def test_bad_split_and_empty_folder(tmp_path):
    with pytest.raises(DbquantError, match="split"):
        load_text("wiki", "train")
    with pytest.raises(DbquantError, match=r"\.txt"):
        load_text(str(tmp_path), "eval")


def test_missing_gensim_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(DbquantError, match="pip install gensim"):
        data._parse_wiki()


def test_calibration_batches_shape_and_determinism(tiny_tokenizer, wiki):
    tokenizer = tiny_tokenizer  # windowing does not depend on the vocabulary: no real model needed
    texts = wiki["calibration"][:5]
    a = calibration_batches(tokenizer, texts, n_samples=8, seq_len=64, seed=0)
    b = calibration_batches(tokenizer, texts, n_samples=8, seq_len=64, seed=0)
    c = calibration_batches(tokenizer, texts, n_samples=8, seq_len=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Windows are slices of the text's own tokens: no BOS/EOS inserted.
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    row = a[0].tolist()
    assert any(ids[s : s + 64] == row for s in range(len(ids) - 63))


def test_calibration_batches_text_too_short(tiny_tokenizer):
    with pytest.raises(DbquantError, match="seq_len"):
        calibration_batches(tiny_tokenizer, ["tiny"], n_samples=1, seq_len=64, seed=0)
