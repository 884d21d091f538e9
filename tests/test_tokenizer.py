"""The released tokenizer's format: a SentencePiece tokenizer.model with tokenizer_config.json beside it
(special tokens, BOS/EOS, add_bos_token, chat template), as Pangu Pro MoE ships it, for generation and
serving. The SentencePiece model is trained inside the test (LLaMA-style options: identity
normalisation, byte fallback, whitespace kept). Also: openPangu-R (PanguProMoEV2ForCausalLM) is
refused by name.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

spm = pytest.importorskip("sentencepiece")

import mogelm  # noqa: E402
from mogelm.checkpoint import save_pretrained  # noqa: E402
from mogelm.cli import main as cli_main  # noqa: E402
from mogelm.errors import UserError  # noqa: E402
from mogelm.hf_config import read_config  # noqa: E402
from mogelm.inference import Engine, SamplingParams, Tokenizer  # noqa: E402
from mogelm.inference.chat import TURN_CLOSE, TURN_OPEN  # noqa: E402

CHINESE = ["混合分组专家模型在每个设备上平衡负载。", "系统：你是一个有帮助的助手。",
           "用户：请写一首关于专家的诗。", "盘古模型使用全局软最大路由。",
           "每个令牌在每个组中选择相同数量的专家。"]
TEXTS = ["def main(argv):\n    return len(argv)  # count\n", "混合分组专家模型，负载均衡。",
         "emoji 🙂 and accents: héllo wörld", "  two leading spaces\tand a tab", "数字 12345 and 3.14"]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """tokenizer.model trained here on real text (the json package's sources and Chinese sentences),
    with tokenizer_config.json in the release's style."""
    import json as json_module

    source = Path(json_module.__file__).parent
    lines = [ln for f in sorted(source.glob("*.py")) for ln in f.read_text().splitlines() if ln.strip()]
    lines += CHINESE * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=[TURN_OPEN, TURN_CLOSE],
        character_coverage=1.0, minloglevel=2, num_threads=1,
    )
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PanguProMoETokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {"3": {"content": TURN_OPEN, "special": True},
                                 "4": {"content": TURN_CLOSE, "special": True}},
    }))
    return d


def test_sentencepiece_round_trip_and_special_tokens(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.bos_token_id == sp.bos_id() == 1 and tok.eos_token_id == sp.eos_id() == 2
    assert tok.vocab_size == 600
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[1:] == sp.encode(text, out_type=int)  # the model's own tokenisation between specials
        assert tok.decode(ids) == text
    emoji = tok.encode("🙂")[1:]
    assert all(sp.is_byte(i) for i in emoji if sp.id_to_piece(i) != "\u2581") and len(emoji) >= 4  # fallback
    # Special tokens inside text map to single ids and split the text around them.
    ids = tok.encode(f"{TURN_OPEN}用户：你好{TURN_CLOSE}</s>")
    assert ids[1] == sp.piece_to_id(TURN_OPEN) and ids[-2] == sp.piece_to_id(TURN_CLOSE) and ids[-1] == 2
    assert tok.decode(ids) == "用户：你好"  # specials skipped
    assert tok.tok.decode(ids, skip_special_tokens=False) == f"<s>{TURN_OPEN}用户：你好{TURN_CLOSE}</s>"
    # A continuation keeps the space of its first piece (the engine decodes generated ids alone).
    ids = tok.encode("return value")
    cut = next(i for i in range(2, len(ids)) if sp.id_to_piece(ids[i]).startswith("\u2581"))
    assert tok.decode(ids[cut:]) == " value" and tok.decode(ids[:cut]) == "return"


def test_partial_utf8_is_replaced_until_complete(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    text = "a🙂b 世界"
    ids = tok.encode(text)
    seen_partial = False
    for n in range(1, len(ids) + 1):
        out = tok.decode(ids[:n])
        seen_partial |= out.endswith("\ufffd")
        assert text.startswith(out.rstrip("\ufffd")), (n, out)
    assert seen_partial  # some prefix ended inside the emoji's four bytes
    assert tok.decode(ids) == text


def test_chat_template_from_config_and_pangu_default(sp_dir, tmp_path):
    tok = Tokenizer.from_dir(sp_dir)  # no chat_template: the Pangu format
    msgs = [{"role": "system", "content": "简短"}, {"role": "user", "content": "你好"}]
    prompt = tok.apply_chat_template(msgs)
    assert prompt == f"<s>{TURN_OPEN}系统：简短{TURN_CLOSE}{TURN_OPEN}用户：你好{TURN_CLOSE}{TURN_OPEN}助手："
    ids = tok.encode(prompt)
    assert ids.count(tok.tok.token_to_id(TURN_OPEN)) == 3 and ids.count(tok.bos_token_id) == 1
    assert tok.chat_stop_token_ids() == [tok.tok.token_to_id(TURN_CLOSE)]
    d = tmp_path / "tpl"
    d.mkdir()
    (d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(d).apply_chat_template(msgs) == "<s><system>简短\n<user>你好\n<assistant>"


def _sp_checkpoint(sp_dir: Path, out: Path) -> Path:
    cfg = mogelm.from_name("debug", vocab_size=600)
    save_pretrained(mogelm.Transformer(cfg), out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (out / name).write_bytes((sp_dir / name).read_bytes())
    return out


def test_engine_and_generate_cli_with_sentencepiece_checkpoint(sp_dir, tmp_path, capsys):
    ckpt = _sp_checkpoint(sp_dir, tmp_path / "ckpt")
    assert not (ckpt / "tokenizer.json").exists()
    engine = Engine.from_pretrained(ckpt, device="cpu", max_batch=2)
    pieces = []
    [out] = engine.generate(["混合分组专家"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    engine.add_request("混合分组专家", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                       on_output=lambda o: pieces.append(o.text))
    while engine.has_unfinished():
        engine.step()
    assert "".join(pieces) == out.text  # streamed text adds up to the final text
    assert out.text == engine.tokenizer.decode(out.token_ids)
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "def main(", "--max-tokens", "4",
                     "--temperature", "0", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["completion_tokens"] == 4 or row["finish_reason"] == "stop"
    # --quantize fp8 reaches the model through Engine.from_pretrained
    assert cli_main(["generate", "--model", str(ckpt), "--prompt", "def main(", "--max-tokens", "4",
                     "--temperature", "0", "--quantize", "fp8", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["token_ids"]) >= 1


def test_missing_tokenizer_and_missing_sentencepiece_are_one_line_errors(sp_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install sentencepiece"):
        Tokenizer.from_dir(sp_dir)


def test_openpangu_r_v2_refused_by_name(tmp_path, capsys):
    hf = {"architectures": ["PanguProMoEV2ForCausalLM"], "model_type": "PanguProMoE", "vocab_size": 1000,
          "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="PanguProMoEV2ForCausalLM"):
        read_config(tmp_path)
    assert cli_main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PanguProMoEV2ForCausalLM" in err[0] and "openPangu-R" in err[0]
    hf["architectures"] = ["PanguProMoEForCausalLM"]  # the V1 name still reads
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert read_config(tmp_path).num_experts == 8
    torch.manual_seed(0)
