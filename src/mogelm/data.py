"""Corpora, byte-level BPE tokenizers and memory-mapped token shards.

    from mogelm import data
    docs = data.load_documents(None)                  # the embedded corpus: CPython stdlib sources
    docs = data.load_documents(["notes/", "*.md"])    # or user files, folders, globs
    ds = data.prepare(docs, vocab_size=8192)          # tokenizer + shards, cached by corpus hash
    x_BT, y_BT = ds.batch("train", sample_indices, seq_len=256)

Pipeline: documents (one per file, or one per line of a .jsonl; user files must be UTF-8 text,
binary data is refused) -> a byte-level BPE trained with
HF `tokenizers` (special tokens EOS `<|endoftext|>` and PAD `<|pad|>`) -> `encode_batch` on
line-aligned chunks -> one token stream per split, documents separated by EOS, written as
uint16/uint32 shards and read back with numpy memmap.

Validation split: documents are cut into line-aligned segments of about 16 KB, and a segment
goes to validation when a hash of (document name, segment index) falls under `val_fraction`.
Adding files does not move the others, and one large file cannot fill the validation set on its
own. When that leaves a split too small (a tiny corpus), the token stream is cut instead: its
last `val_fraction` goes to validation.

Cache layout (`$MOGELM_CACHE`, default ~/.cache/mogelm): `<hash>/` with tokenizer.json,
tokenizer_config.json, train-00000.bin..., val-00000.bin, meta.json. The hash covers the
documents' names and bytes, the vocabulary size, the split and this file's format version.
A cache entry is written into a temporary folder and renamed, so it is either whole or absent.

Batches are stateless: sample i of an epoch is window perm[i] of the split, where perm is a
seeded permutation of the non-overlapping seq_len+1 windows. The data position is therefore a
single integer (samples consumed), which makes resuming exact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mogelm.errors import UserError

FORMAT_VERSION = 2
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the specials, and at least one merge
SHARD_TOKENS = 1 << 26  # 64 M tokens per shard file
_STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_CHUNK_CHARS = 4096  # encode_batch works on line-aligned pieces of about this size
_SEGMENT_CHARS = 16384  # unit of the train/validation split


@dataclass(frozen=True)
class Document:
    name: str  # relative path (or path:line for .jsonl records); decides the split
    text: str
    eos: bool = True  # followed by EOS in the token stream (False for all but a document's last segment)


# Corpora -----------------------------------------------------------------------------------------
def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The CPython standard library's .py sources, sorted, without test suites, IDLE or site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def default_documents(max_bytes: int | None = None) -> list[Document]:
    """The embedded corpus: the stdlib sources (about 11 MB), optionally the first `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in stdlib_files(root):
        text = _read_text(path)
        if not text.strip():
            continue
        docs.append(Document(path.relative_to(root).as_posix(), text))
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs:
        raise UserError(f"no Python sources found in the standard library at {root}; pass --data")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _read_user_text(path: Path, warn) -> str:
    """A user's text file as UTF-8. Binary data (a NUL byte, or more than 1 % of the bytes not
    UTF-8) is refused; a few stray bytes are replaced by U+FFFD, and `warn` says how many."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\0" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if b"\0" in raw or bad > max(8, len(raw) // 100):
        why = "it holds NUL bytes" if b"\0" in raw else f"{bad:,} of its {len(raw):,} bytes are not UTF-8"
        raise UserError(f"{path} is not UTF-8 text ({why}: binary data?); convert it to UTF-8 or leave it "
                        "out of --data")
    warn(f"warning: {path}: {bad} byte(s) that are not UTF-8 were replaced by U+FFFD")
    return text


def resolve_paths(specs: Sequence[str]) -> list[Path]:
    """Files named by `specs` (files, folders searched recursively, or globs), sorted, deduplicated."""
    found: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
            matches = [m for m in matches if m.is_file() and m.suffix in TEXT_SUFFIXES]
            if not matches:
                raise UserError(f"--data {spec!r} matches no {'/'.join(TEXT_SUFFIXES)} files")
            found += matches
        elif p.is_dir():
            matches = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not matches:
                raise UserError(f"--data folder {spec} holds no {'/'.join(TEXT_SUFFIXES)} files")
            found += matches
        elif p.is_file():
            if p.suffix not in TEXT_SUFFIXES:
                raise UserError(f"--data {spec}: unsupported file type {p.suffix!r}; "
                                f"use {', '.join(TEXT_SUFFIXES)}")
            found.append(p)
        elif p.exists():
            raise UserError(f"--data {spec} is neither a file nor a folder")
        else:
            raise UserError(f"--data {spec}: no such file or folder")
    unique = sorted({f.resolve() for f in found})
    for f in unique:
        if not os.access(f, os.R_OK):
            raise UserError(f"cannot read {f}: permission denied")
    return unique


def _common_root(paths: list[Path]) -> Path:
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return root


def load_documents(specs: Sequence[str] | None, max_bytes: int | None = None, warn=None) -> list[Document]:
    """Documents from user paths, or the embedded stdlib corpus when `specs` is empty. User files
    must be UTF-8 text (`warn`, default stderr, reports a few replaced bytes)."""
    if not specs:
        return default_documents(max_bytes)
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = resolve_paths(specs)
    root = _common_root(paths)
    docs: list[Document] = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        text = _read_user_text(path, warn)
        if path.suffix == ".jsonl":
            docs += _jsonl_documents(path, name, text)
        elif text.strip():
            docs.append(Document(name, text))
    if not docs:
        raise UserError(f"the corpus is empty: {', '.join(specs)} holds no text")
    return docs


def _jsonl_documents(path: Path, name: str, text: str) -> list[Document]:
    """One document per line: a JSON string, or an object with a "text" (or "content") field."""
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i} is not valid JSON ({e.msg})") from None
        if isinstance(rec, dict):
            rec = rec.get("text", rec.get("content"))
        if not isinstance(rec, str):
            raise UserError(f"{path}:{i}: expected a string or an object with a string \"text\" field")
        if rec.strip():
            docs.append(Document(f"{name}:{i}", rec))
    return docs


def corpus_hash(docs: Sequence[Document], *parts: object) -> str:
    h = hashlib.sha256(f"mogelm-data-v{FORMAT_VERSION}|{'|'.join(map(str, parts))}".encode())
    for d in docs:
        h.update(d.name.encode() + b"\0")
        h.update(hashlib.sha256(d.text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()


# Tokenizer -------------------------------------------------------------------------------------
def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    """Line-aligned pieces of about `size` characters (their concatenation is `text`)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def train_tokenizer(docs: Iterable[Document], vocab_size: int):
    """Byte-level BPE with EOS/PAD specials, trained offline with HF tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocabulary size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((c for d in docs for c in _chunks(d.text)), trainer=trainer)
    return tok


def tokenizer_config(tok) -> dict:
    """The small tokenizer_config.json written beside tokenizer.json (EOS/BOS for generation). It is
    also what `transformers.AutoTokenizer.from_pretrained(dir)` reads (lm-eval's huggingface
    tokenizer backend): the class, the special tokens, no BOS/EOS added on encode (mogelm adds none),
    and no clean-up of spaces on decode (transformers 4.x cleans by default, which changes " ." to ".")."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "eos_token_id": tok.token_to_id(EOS_TOKEN),
        "bos_token_id": tok.token_to_id(EOS_TOKEN),
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
        "vocab_size": tok.get_vocab_size(),
    }


def load_tokenizer(path: str | os.PathLike):
    """A tokenizers.Tokenizer from a tokenizer.json file or a folder holding one."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise UserError(f"{file} is not a valid tokenizer file ({e})") from None


def encode_documents(tok, docs: Sequence[Document], eos_id: int) -> np.ndarray:
    """Concatenated token ids, each document followed by EOS. int64 [N]."""
    pieces, owner = [], []
    for i, d in enumerate(docs):
        for c in _chunks(d.text):
            pieces.append(c)
            owner.append(i)
    encoded = tok.encode_batch(pieces, add_special_tokens=False) if pieces else []
    out: list[np.ndarray] = []
    for j, enc in enumerate(encoded):
        out.append(np.asarray(enc.ids, dtype=np.int64))
        if (j + 1 == len(encoded) or owner[j + 1] != owner[j]) and docs[owner[j]].eos:
            out.append(np.asarray([eos_id], dtype=np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def check_token_range(ids: np.ndarray | torch.Tensor, vocab_size: int, what: str) -> None:
    """UserError when any id falls outside [0, vocab_size) (e.g. a tokenizer larger than the model)."""
    if len(ids) == 0:
        return
    hi, lo = int(ids.max()), int(ids.min())
    if lo < 0 or hi >= vocab_size:
        raise UserError(
            f"{what} holds token id {hi if hi >= vocab_size else lo}, outside the model's vocabulary "
            f"[0, {vocab_size}); use a tokenizer with at most {vocab_size} tokens (or a larger --vocab-size)"
        )


# Shards and the dataset ------------------------------------------------------------------------------
def _segments(doc: Document, size: int = _SEGMENT_CHARS) -> list[Document]:
    """The document in line-aligned segments of about `size` characters, made of whole _chunks so
    that encoding the segments gives exactly the tokens of encoding the document."""
    out, buf = [], []
    for c in _chunks(doc.text):
        buf.append(c)
        if sum(map(len, buf)) >= size:
            out.append("".join(buf))
            buf = []
    if buf or not out:
        out.append("".join(buf))
    return [Document(f"{doc.name}#{j}", t, eos=doc.eos and j == len(out) - 1) for j, t in enumerate(out)]


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    train, val = [], []
    for d in docs:
        for seg in _segments(d):
            u = int.from_bytes(hashlib.sha256(seg.name.encode()).digest()[:8], "big") / 2**64
            (val if u < val_fraction else train).append(seg)
    return train, val


def _write_shards(folder: Path, split: str, ids: np.ndarray, dtype) -> list[str]:
    names = []
    for i, start in enumerate(range(0, max(len(ids), 1), SHARD_TOKENS)):
        name = f"{split}-{i:05d}.bin"
        ids[start : start + SHARD_TOKENS].astype(dtype).tofile(folder / name)
        names.append(name)
    return names


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOGELM_CACHE") or Path.home() / ".cache" / "mogelm")


class TokenData:
    """Train and validation token streams of a prepared corpus (memmapped), with its tokenizer."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            dtype = np.dtype(self.meta["dtype"])
            self.splits = {
                split: np.concatenate([np.memmap(self.folder / n, dtype=dtype, mode="r") for n in names])
                if len(names) > 1
                else np.memmap(self.folder / names[0], dtype=dtype, mode="r")
                for split, names in self.meta["shards"].items()
            }
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"token cache {self.folder} is unreadable ({e}); "
                            "delete it and run again") from None
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])

    @property
    def tokenizer_file(self) -> Path:
        return self.folder / "tokenizer.json"

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_file)

    def num_tokens(self, split: str) -> int:
        return len(self.splits[split])

    def num_windows(self, split: str, seq_len: int) -> int:
        return (len(self.splits[split]) - 1) // seq_len

    def window_order(self, split: str, seq_len: int, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows(split, seq_len), generator=g)

    def batch(self, split: str, sample_ids: Sequence[int], seq_len: int, seed: int = 0, shuffle: bool = True):
        """Inputs and next-token targets, int64 [len(sample_ids), seq_len] each.

        Sample i (a global counter over the run) is window perm_e[i % W] of epoch e = i // W,
        or window i % W in order when shuffle is False (validation)."""
        W = self.num_windows(split, seq_len)
        if W < 1:
            raise UserError(
                f"the {split} split has {self.num_tokens(split)} tokens, fewer than one sequence of "
                f"{seq_len + 1}; use more text or a smaller --seq-len"
            )
        stream = self.splits[split]
        rows = []
        orders: dict[int, torch.Tensor] = {}
        for i in sample_ids:
            epoch, k = divmod(int(i), W)
            if shuffle:
                if epoch not in orders:
                    orders[epoch] = self.window_order(split, seq_len, seed, epoch)
                k = int(orders[epoch][k])
            rows.append(np.asarray(stream[k * seq_len : k * seq_len + seq_len + 1], dtype=np.int64))
        xy = torch.from_numpy(np.stack(rows))
        return xy[:, :-1], xy[:, 1:]


def prepare(
    docs: Sequence[Document],
    vocab_size: int,
    val_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    log=None,
) -> TokenData:
    """Tokenizer + train/val shards for `docs`, from the cache when the same corpus was seen before."""
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocabulary size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)"
        )
    if not docs:
        raise UserError("the corpus is empty")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = corpus_hash(docs, vocab_size, val_fraction)[:20]
    folder = cache_dir / key
    if (folder / "meta.json").is_file():
        return TokenData(folder)
    log = log or (lambda msg: None)
    nbytes = sum(len(d.text) for d in docs)
    log(f"tokenizer: training a {vocab_size}-token byte-level BPE on {len(docs)} documents "
        f"({nbytes / 1e6:.1f} MB)")
    tok = train_tokenizer(docs, vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_docs, val_docs = split_documents(docs, val_fraction)
    train_ids = encode_documents(tok, train_docs, eos_id)
    val_ids = encode_documents(tok, val_docs, eos_id)
    total = len(train_ids) + len(val_ids)
    if min(len(train_ids), len(val_ids)) < 0.25 * val_fraction * total:
        # Too few documents to split by name (e.g. one file): cut the stream instead.
        ids = encode_documents(tok, docs, eos_id)
        cut = int(len(ids) * (1 - val_fraction))
        train_ids, val_ids = ids[:cut], ids[cut:]
    real_vocab = tok.get_vocab_size()
    check_token_range(train_ids, real_vocab, "the tokenized corpus")
    log(f"tokenizer: {len(train_ids):,} train and {len(val_ids):,} validation tokens")

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        dtype = np.uint16 if real_vocab <= 1 << 16 else np.uint32
        shards = {"train": _write_shards(tmp, "train", train_ids, dtype),
                  "val": _write_shards(tmp, "val", val_ids, dtype)}
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2))
        meta = {
            "format": FORMAT_VERSION,
            "vocab_size": real_vocab,
            "eos_id": eos_id,
            "dtype": np.dtype(dtype).name,
            "shards": shards,
            "num_segments": {"train": len(train_docs), "val": len(val_docs)},
            "num_tokens": {"train": len(train_ids), "val": len(val_ids)},
            "bytes": nbytes,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first: use theirs
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenData(folder)
