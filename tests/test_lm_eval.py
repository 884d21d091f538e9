"""lm-evaluation-harness drives `mogelm serve` unchanged, and the checkpoint's tokenizer loads in HF.

lm-eval's `local-completions` model talks to the server as it would to vLLM: it checks
GET /tokenizer_info and POST /tokenize (tokenizer_backend=remote), sends token-id prompts, and
  - for generate_until tasks: `max_tokens`, `temperature: 0`, `stop` = the task's `until` + EOS;
  - for log-likelihood tasks: `echo: true, logprobs: 1, max_tokens: 1` and reads the prompt's
    `token_logprobs` / `top_logprobs` (the engine's prompt logprobs).
Both tasks are tests/lm_eval_tasks/*.yaml over JSONL files beside them (no download; not under
tests/data/, which other tests read as a training corpus). Results are compared with a direct
computation on the same checkpoint: greedy decoding through an uncached forward (generation) and
the sum of log_softmax over the continuation (log-likelihood).

Needs the `eval` extra (lm-eval, transformers); scripts/test.sh installs it.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from test_inference import argmax_reference
from test_server import MODEL, serving_in_thread

from mogelm.inference import Engine
from mogelm.inference.server import create_app

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "lm_eval_tasks"

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install '.[eval]')")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(ckpt):
    engine = Engine.from_pretrained(ckpt, max_batch=4)
    with serving_in_thread(create_app(engine, MODEL)) as url:
        yield url, engine


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    from test_inference import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("inference"))


def run_lm_eval(url: str, task: str, **model_args) -> dict:
    """lm_eval.simple_evaluate against the server, offline, from the repository root (the task
    files name their data relative to it); only our task folder is indexed (the built-in task
    index alone takes tens of seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        args = {"model": MODEL, "base_url": url + "/v1/completions", "tokenizer_backend": "remote",
                "max_retries": 1, "num_concurrent": 1, "max_length": 256, **model_args}
        return simple_evaluate(model="local-completions", model_args=args, tasks=[task], log_samples=True,
                               task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                               random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


@pytest.fixture(scope="module")
def gen_remote(served) -> dict:
    return run_lm_eval(served[0], "mogelm_gen")


def direct_loglikelihood(engine, context: str, continuation: str) -> tuple[float, bool]:
    """What lm-eval computes, the way `mogelm eval` scores text: the continuation's tokens are those
    of context + continuation after the context's (lm-eval's split); the sum of their log_softmax
    from one uncached forward, and whether each is the argmax."""
    tok = engine.tokenizer
    whole = tok.tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.tok.encode(context, add_special_tokens=False).ids
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp_TV = torch.log_softmax(engine.model(torch.tensor([whole[:-1]]))[0].double(), dim=-1)
    rows = logp_TV[len(ctx) - 1:]
    ll = sum(float(rows[i, t]) for i, t in enumerate(cont))
    greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(cont))
    return ll, greedy


def test_generate_until_task_matches_direct_greedy_decoding(served, gen_remote):
    engine, out = served[1], gen_remote
    samples = out["samples"]["mogelm_gen"]
    docs = [json.loads(line) for line in (TASKS / "mogelm_gen.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    tok = engine.tokenizer
    hits = []
    for s in samples:
        [(context, kwargs)] = s["arguments"]
        ids = argmax_reference(engine.model, tok.tok.encode(context, add_special_tokens=False).ids,
                               kwargs["max_gen_toks"], tok.eos_token_id)
        text = tok.decode(ids)
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text, context
        hits.append(text == s["target"])
    assert out["results"]["mogelm_gen"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    assert sum(hits) >= 3  # the fixture model knows its text: the task is not trivially failed


def test_multiple_choice_task_matches_direct_scoring(served):
    url, engine = served
    out = run_lm_eval(url, "mogelm_mc")
    samples = out["samples"]["mogelm_mc"]
    assert len(samples) == 6
    correct = []
    for s in samples:
        lls = []
        for i, (ll, greedy) in enumerate(r[0] for r in s["resps"]):
            context, continuation = s["arguments"][i]
            want_ll, want_greedy = direct_loglikelihood(engine, context, continuation)
            assert ll == pytest.approx(want_ll, abs=1e-3 * max(1.0, abs(want_ll))), (context, continuation)
            assert greedy == want_greedy
            lls.append(want_ll)
        correct.append(max(range(len(lls)), key=lls.__getitem__) == s["target"])
        assert all(math.isfinite(x) for x in lls)
    assert out["results"]["mogelm_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_checkpoint_tokenizer_loads_with_autotokenizer(tmp_path, monkeypatch):
    """A tokenizer written by mogelm's data pipeline (tokenizer.json + tokenizer_config.json) loads
    with transformers.AutoTokenizer (what lm-eval's tokenizer_backend=huggingface does) and encodes,
    decodes and names its special tokens exactly as mogelm's own Tokenizer."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mogelm.data import Document, tokenizer_config, train_tokenizer
    from mogelm.inference.chat import Tokenizer

    text = (REPO / "src" / "mogelm" / "model.py").read_text() + "你好，世界。 naïve café"
    tok = train_tokenizer([Document("model.py", text)], 400)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok)))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    assert (hf.eos_token, hf.eos_token_id) == (ours.eos_token, ours.eos_token_id)
    assert (hf.bos_token, hf.bos_token_id) == (ours.bos_token, ours.bos_token_id)
    assert hf.pad_token_id == tok.token_to_id("<|pad|>")
    for sample in ("def forward(self, x_BTD):\n    return x", "a , b . c 's  do n't", "你好 café"):
        ids = ours.encode(sample)
        assert hf(sample, add_special_tokens=True).input_ids == ids
        assert hf.decode(ids) == ours.decode(ids) == sample
    assert not hf.clean_up_tokenization_spaces


def test_generate_until_through_the_huggingface_tokenizer_backend(served, gen_remote, ckpt):
    """lm-eval tokenizes with AutoTokenizer.from_pretrained(checkpoint) and sends token ids: the same
    answers as through the server's /tokenize."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    out = run_lm_eval(served[0], "mogelm_gen", tokenizer_backend="huggingface", tokenizer=str(ckpt))
    assert [s["resps"] for s in out["samples"]["mogelm_gen"]] == \
        [s["resps"] for s in gen_remote["samples"]["mogelm_gen"]]
