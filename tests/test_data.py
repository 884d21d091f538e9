"""mogelm.data: corpora, tokenizer training, shards, batches, and bad input."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mogelm import data as D
from mogelm.errors import UserError

FIXTURES = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    docs = D.load_documents([str(FIXTURES)])
    return docs, D.prepare(docs, vocab_size=384, cache_dir=cache), cache


def test_stdlib_corpus_is_sorted_and_has_no_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = D.stdlib_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert all(f.suffix == ".py" for f in files)
    for part in ("test", "tests", "idlelib", "site-packages"):
        assert not any(part in Path(r).parts[:-1] for r in rel), part
    assert "os.py" in rel and "json/decoder.py" in rel


def test_load_documents_folder_glob_and_jsonl():
    docs = D.load_documents([str(FIXTURES)])
    names = [d.name for d in docs]
    assert "zen.md" in names and "stdlib_docstrings.txt" in names
    jsonl = [d for d in docs if d.name.startswith("builtins.jsonl:")]
    assert len(jsonl) == len((FIXTURES / "builtins.jsonl").read_text().splitlines())
    assert jsonl[0].text == json.loads((FIXTURES / "builtins.jsonl").read_text().splitlines()[0])["text"]
    globbed = D.load_documents([str(FIXTURES / "*.md")])
    assert [d.name for d in globbed] == ["zen.md"]


def test_prepare_roundtrip_split_and_cache(prepared):
    docs, td, cache = prepared
    tok = td.tokenizer()
    eos = tok.token_to_id(D.EOS_TOKEN)
    assert eos == td.eos_id and tok.token_to_id(D.PAD_TOKEN) is not None
    assert td.vocab_size <= 384
    # Byte-level BPE is lossless: decoding the stream gives the documents back, EOS-separated.
    text = docs[0].text
    assert tok.decode(D.encode_documents(tok, [docs[0]], eos)[:-1].tolist()) == text
    # Both splits exist and together hold every token of the corpus.
    total = len(D.encode_documents(tok, docs, eos))
    assert td.num_tokens("val") > 0 and td.num_tokens("train") > td.num_tokens("val")
    assert td.num_tokens("train") + td.num_tokens("val") == total
    cfg = json.loads((td.folder / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == D.EOS_TOKEN and cfg["eos_token_id"] == eos
    # A second prepare of the same corpus is a cache hit: same folder, files untouched.
    mtime = (td.folder / "train-00000.bin").stat().st_mtime_ns
    again = D.prepare(docs, vocab_size=384, cache_dir=cache)
    assert again.folder == td.folder and (td.folder / "train-00000.bin").stat().st_mtime_ns == mtime
    # A different vocabulary is a different entry.
    other = D.prepare(docs, vocab_size=300, cache_dir=cache)
    assert other.folder != td.folder and other.vocab_size <= 300


def test_batches_are_deterministic_shifted_windows(prepared):
    _, td, _ = prepared
    x1, y1 = td.batch("train", range(0, 4), 32, seed=3)
    x2, y2 = td.batch("train", range(0, 4), 32, seed=3)
    x3, _ = td.batch("train", range(0, 4), 32, seed=4)
    assert x1.shape == (4, 32) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # One epoch visits every window exactly once.
    W = td.num_windows("train", 32)
    xs, _ = td.batch("train", range(W), 32, seed=0)
    stream = torch.from_numpy(np.asarray(td.splits["train"][: W * 32], dtype=np.int64)).view(W, 32)
    assert sorted(map(tuple, xs.tolist())) == sorted(map(tuple, stream.tolist()))


def test_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="too small"):
        D.prepare(D.load_documents([str(FIXTURES / "zen.md")]), vocab_size=100, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="empty"):
        D.load_documents([str(tmp_path)])
    with pytest.raises(UserError, match="no such file"):
        D.load_documents([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="matches no"):
        D.load_documents([str(tmp_path / "*.md")])
    (tmp_path / "a.csv").write_text("x,y\n")
    with pytest.raises(UserError, match="unsupported"):
        D.load_documents([str(tmp_path / "a.csv")])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        D.load_documents([str(tmp_path / "bad.jsonl")])


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "secret.txt"
    f.write_text("hidden text")
    # chmod 0 does not stop root (CI runs as root), so make the read itself fail as it would
    real_read_bytes = type(f).read_bytes

    def read_bytes(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(type(f), "read_bytes", read_bytes)
    with pytest.raises(UserError, match="cannot read|permission|Permission"):
        D.load_documents([str(f)])


def test_token_range_check():
    D.check_token_range(np.array([0, 5, 9]), 10, "ids")
    with pytest.raises(UserError, match="token id 10"):
        D.check_token_range(np.array([0, 10]), 10, "ids")
