"""Tokenizer loading and chat templates.

A checkpoint directory holds `tokenizer.json` (HF `tokenizers`, byte-level BPE) and
`tokenizer_config.json` with `bos_token` / `eos_token` strings, optionally `add_bos_token` and a
Jinja `chat_template` (the HF convention). Without a template, chat messages use the Pangu format
(PAPER.md §3.4), with full-width colons:

    {bos}[unused9]系统：{system}[unused10][unused9]用户：{user}[unused10][unused9]助手：

`[unused9]` opens a turn and `[unused10]` closes it, so `[unused10]` (when the vocabulary has it)
also stops generation of the assistant's turn.
"""

from __future__ import annotations

import json
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
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"{path} has no tokenizer.json; a checkpoint for generation needs its tokenizer")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a plain Exception for unreadable files
            raise UserError(f"{path / 'tokenizer.json'} is not a valid tokenizer file ({e})") from None
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"{path / 'tokenizer_config.json'} is not valid JSON ({e})") from None
        return cls(tok, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")),
                   cfg.get("chat_template"), bool(cfg.get("add_bos_token", False)))

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
