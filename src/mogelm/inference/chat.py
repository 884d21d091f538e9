"""Tokenizer loading and chat templates.

A checkpoint directory holds `tokenizer.json` (HF `tokenizers`, byte-level BPE; what `mogelm train`
writes) or a SentencePiece `tokenizer.model` (what the published Pangu Pro MoE release ships), and
`tokenizer_config.json` with `bos_token` / `eos_token` strings, optionally `add_bos_token`, other
special tokens (`unk_token`, `pad_token`, `additional_special_tokens`, `added_tokens_decoder`) and
a Jinja `chat_template` (the HF convention). tokenizer.json wins when both are present.

SentencePiece (SentencePieceBackend, needs the `sentencepiece` package): special tokens are split
out of the text first and map to their ids; the text between them is encoded by the model, each
run on its own (as HF's slow SentencePiece tokenizers do, dummy-prefix space included). Decoding
joins pieces and byte-fallback bytes and turns an incomplete UTF-8 tail into U+FFFD (the engine
holds such text back while streaming). It keeps a leading space ("▁world" -> " world") so that a
continuation decodes with its space; the dummy-prefix space the encoder added at a text start is
dropped only where the ids show a text start (after BOS or another special token), so
decode(encode(text)) == text when add_bos_token is set, as the release sets it.

Without a template, chat messages use the Pangu format
(PAPER.md §3.4), with full-width colons:

    {bos}[unused9]系统：{system}[unused10][unused9]用户：{user}[unused10][unused9]助手：

`[unused9]` opens a turn and `[unused10]` closes it, so `[unused10]` (when the vocabulary has it)
also stops generation of the assistant's turn.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mogelm.errors import UserError

TURN_OPEN, TURN_CLOSE = "[unused9]", "[unused10]"
PANGU_ROLES = {"system": "系统", "user": "用户", "assistant": "助手"}


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def message_text(content) -> str:
    """OpenAI message content: a string, or a list of parts of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def pangu_chat_prompt(messages: list[dict], bos_token: str = "", add_generation_prompt: bool = True) -> str:
    parts = [bos_token]
    for m in messages:
        role = m.get("role")
        if role not in PANGU_ROLES:
            raise ValueError(f"unsupported message role {role!r}; use one of {', '.join(PANGU_ROLES)}")
        parts.append(f"{TURN_OPEN}{PANGU_ROLES[role]}：{message_text(m.get('content'))}{TURN_CLOSE}")
    if add_generation_prompt:
        parts.append(f"{TURN_OPEN}{PANGU_ROLES['assistant']}：")
    return "".join(parts)


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class SentencePieceBackend:
    """A SentencePiece model behind the part of the `tokenizers.Tokenizer` API that Tokenizer and
    the engine use (token_to_id, get_vocab_size, encode(...).ids, decode). `special` are the
    special-token strings of tokenizer_config.json; `added` maps extra tokens (ids past the
    model's pieces, from added_tokens_decoder) to their ids."""

    def __init__(self, sp, special: list[str], added: dict[str, int] | None = None):
        self.sp = sp
        self.added = dict(added or {})
        self.added_by_id = {i: t for t, i in self.added.items()}
        self.size = sp.get_piece_size()
        control = [sp.id_to_piece(i) for i in range(self.size) if sp.is_control(i)]
        # Pangu's turn markers are ordinary pieces of its vocabulary: split them out like specials.
        turn = [t for t in (TURN_OPEN, TURN_CLOSE) if self._piece_id(t) is not None]
        self.special = {t: i for t in [*special, *control, *turn, *self.added]
                        if t and (i := self.token_to_id(t)) is not None}
        self.special_ids = set(self.special.values()) | {i for i in range(self.size) if sp.is_control(i)}
        pattern = "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.dummy_prefix = sp.encode("x", out_type=str)[0].startswith("\u2581")

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if self.sp.is_unknown(i) and piece != self.sp.id_to_piece(i) else i

    def token_to_id(self, token: str) -> int | None:
        return self.added[token] if token in self.added else self._piece_id(token)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return max([self.size - 1, *(self.added_by_id if with_added_tokens else [])]) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        ids: list[int] = []
        for part in (self._split.split(text) if self._split else [text]):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        return _Encoding(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        text_start = False  # after BOS / a special token: the encoder put a dummy-prefix space here
        for i in ids:
            if i in self.special_ids or i in self.added_by_id:
                if not skip_special_tokens:
                    out += (self.added_by_id.get(i) or self.sp.id_to_piece(i)).encode()
                text_start = True
                continue
            if not 0 <= i < self.size:
                raise ValueError(f"token id {i} is outside the vocabulary")
            if self.sp.is_byte(i):  # byte fallback: "<0xE4>"
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))
            else:
                piece = self.sp.id_to_piece(i)
                if text_start and self.dummy_prefix and piece.startswith("\u2581"):
                    piece = piece[1:]
                out += piece.replace("\u2581", " ").encode()
            text_start = False
        return out.decode("utf-8", errors="replace")


def _load_sentencepiece(file: Path, cfg: dict) -> SentencePieceBackend:
    try:
        import sentencepiece
    except ImportError:
        raise UserError(f"{file} is a SentencePiece model: install the `sentencepiece` package "
                        "(pip install sentencepiece, or mogelm[serve])") from None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{file} is not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
    special = [_token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    special += [_token_str(t) for t in cfg.get("additional_special_tokens") or []]
    added = {}
    for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
        content = _token_str(entry)
        if content and str(key).isdigit():
            if int(key) >= sp.get_piece_size():
                added[content] = int(key)
            elif isinstance(entry, dict) and entry.get("special", True):
                special.append(content)
    return SentencePieceBackend(sp, [t for t in special if t], added)


class Tokenizer:
    """Encode/decode plus the special tokens and chat template of a checkpoint directory."""

    def __init__(self, tok, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False):
        self.tok = tok  # tokenizers.Tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None
        self.turn_close_id = tok.token_to_id(TURN_CLOSE)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self._jinja = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise UserError(f"{path / 'tokenizer_config.json'} is not a JSON object")
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a plain Exception for unreadable files
                raise UserError(f"{path / 'tokenizer.json'} is not a valid tokenizer file ({e})") from None
        elif (path / "tokenizer.model").is_file():
            tok = _load_sentencepiece(path / "tokenizer.model", cfg)
        else:
            raise UserError(f"{path} has no tokenizer.json or tokenizer.model; a checkpoint for generation "
                            "needs its tokenizer")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # HF also stores named templates: [{"name", "template"}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(tok, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   template if isinstance(template, str) else None, bool(cfg.get("add_bos_token", False)))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (ValueError for messages the template cannot render)."""
        if not messages:
            raise ValueError("messages must not be empty")
        if not self.chat_template:
            return pangu_chat_prompt(messages, self.bos_token or "", add_generation_prompt)
        if self._jinja is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._jinja = env.from_string(self.chat_template)
        msgs = [{**m, "content": message_text(m.get("content"))} for m in messages]
        try:
            return self._jinja.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                      bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except Exception as e:  # template errors (including raise_exception in HF templates)
            raise ValueError(f"chat template failed: {e}") from None

    def chat_stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn besides EOS ([unused10] in the Pangu format)."""
        return [self.turn_close_id] if self.turn_close_id is not None and not self.chat_template else []
