"""Serving across processes on CPU (gloo): tensor-parallel attention + expert-group MoE
(mogelm.parallel.tensor_parallel) and the lockstep engine (mogelm.inference.distributed),
compared with one process; `mogelm serve --nproc 2` driven by the official `openai` client.

One spawn of 4 gloo ranks runs most checks (spawning costs seconds; STYLE.md 7): forward logits
at 2 ranks (ranks 0-1 and 2-3 as two pairs) and at 4, every MoE dispatch, sharded loading, and
lockstep engines (2 pairs and all 4 ranks) whose greedy and seeded outputs, preemptions and
aborts must equal one process's token for token; last, a pair whose follower dies while the
leader is idle (the heartbeat must notice). The server tests start the real CLI under torchrun.

    .venv/bin/pytest tests/test_serve_distributed.py -q     # about 2 minutes on 2 busy cores
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_inference import SPECIAL, TEXT, build_checkpoint, train_on_text
from test_parallel import _assert_clean, _check, _init, _spawn

import mogelm
from mogelm.cli import main as cli_main
from mogelm.config import from_name
from mogelm.inference import Engine, SamplingParams
from mogelm.inference.shards import load_sharded
from mogelm.parallel.tensor_parallel import sharder

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"


# Fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The inference tests' trained debug model (2 KV heads: splits over 2 ranks)."""
    return build_checkpoint(tmp_path_factory.mktemp("inference"))


@pytest.fixture(scope="module")
def ckpt4(ckpt, tmp_path_factory) -> Path:
    """The same recipe with 8 query / 4 KV heads (splits over 4 ranks), trained 60 steps."""
    d = tmp_path_factory.mktemp("kv4") / "ckpt"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((ckpt / f).read_bytes())
    from mogelm.inference.chat import Tokenizer

    ids = Tokenizer.from_dir(d).encode(TEXT * 4)
    model, loss = train_on_text(from_name("debug", num_heads=8, num_kv_heads=4), ids, seed=1)
    assert loss < 1.5, f"the kv-4 fixture model did not learn its text (loss {loss:.2f})"
    assert SPECIAL  # the tokenizer above carries the inference tests' special tokens
    mogelm.save_pretrained(model, d)
    return d


@pytest.fixture(scope="module")
def ckpt_mtp(ckpt, tmp_path_factory) -> Path:
    """A debug model with one MTP module (random weights; config num_nextn_predict_layers 1)."""
    d = tmp_path_factory.mktemp("mtp") / "ckpt"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((ckpt / f).read_bytes())
    torch.manual_seed(2)
    model = mogelm.Transformer(from_name("debug", mtp_depth=1))
    assert model.mtp is not None
    mogelm.save_pretrained(model, d)
    return d


# In the spawned ranks --------------------------------------------------------------------------------
PROMPTS = ["The quick", "def add(a", "for i in", "Servers answer", "Mixture of grouped", "A small model",
           "print(i", "so every device", "return a", "The lazy dog"]
ENGINE_KW = dict(max_batch=4, chunk_size=8, kv_cache_tokens=96, block_size=16)  # 6 blocks: preemptions


def _scenario(engine) -> dict:
    """What both engines run: 10 prompts over 4 slots and a 6-block cache (continuous batching,
    chunked prefill, preemption), greedy plus two seeded samplers; then three requests, one aborted
    after three steps."""
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in PROMPTS]
    params[3] = SamplingParams(max_tokens=20, temperature=0.8, top_k=40, seed=11, ignore_eos=True)
    params[7] = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    comps = engine.generate(PROMPTS, params)
    out = {"generate": [(c.token_ids, c.finish_reason) for c in comps],
           "preemptions": engine.scheduler.num_preemptions}
    reqs = [engine.add_request(p, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
            for p in PROMPTS[:3]]
    for _ in range(3):
        engine.step()
    engine.abort(reqs[1].id)
    while engine.has_unfinished():
        engine.step()
    out["abort"] = [(r.output_ids, r.finish_reason) for r in reqs]
    if hasattr(engine, "add_choices"):  # where the engine serves them: n choices of one prefill,
        # logprobs and a penalty (the request life cycle); the logprob values are compared apart
        params = SamplingParams(max_tokens=8, temperature=0.9, seed=3, logprobs=2, presence_penalty=0.5,
                                prompt_logprobs=1, ignore_eos=True)
        reqs = engine.add_choices("def add(a", params, n=3)
        while engine.has_unfinished():
            engine.step()
        out["choices"] = [(r.output_ids, r.finish_reason, [lp.token_id for lp in r.logprobs]) for r in reqs]
        out["logprob_values"] = [lp.logprob for r in reqs for lp in r.logprobs]
    return out


def _lockstep_round(errors, name, ckpt, group, control, leader: bool):
    """A LockstepEngine over `group` (data) / `control` runs _scenario on its leader; the leader
    compares with a one-process Engine on the same checkpoint."""
    from mogelm.inference.chat import Tokenizer
    from mogelm.inference.distributed import LockstepEngine
    failures = []
    model = load_sharded(ckpt, sharder(group), "cpu")
    engine = LockstepEngine(model, Tokenizer.from_dir(ckpt), control, heartbeat_s=0.2,
                            on_failure=lambda e, r, w: failures.append(f"{type(e).__name__}: {e}"),
                            **ENGINE_KW)
    if not leader:
        steps = engine.follow()
        if failures or steps < 10:
            errors.append(f"{name}: follower rank {dist.get_rank()} failed after {steps} steps: {failures}")
        return
    got = _scenario(engine)
    engine.close()
    want = _scenario(Engine.from_pretrained(ckpt, **ENGINE_KW))
    if want["preemptions"] == 0:
        errors.append(f"{name}: the scenario did not preempt (make the cache smaller)")
    for key in want:
        if key == "logprob_values":
            _check(errors, f"{name}: logprobs", torch.tensor(got[key]), torch.tensor(want[key]), tol=1e-4)
        elif got[key] != want[key]:
            errors.append(f"{name}: {key} differs from one process:\n  {got[key]}\n  {want[key]}")
    if failures:
        errors.append(f"{name}: leader failures {failures}")


def _forward_cases(errors, name, group, cfg_overrides: dict):
    """apply_tensor_parallel's logits (prefill and a decode through a KV cache) equal one process's,
    for MoGE and top-k routing and every dispatch that applies."""
    from mogelm.model import KVCache, Transformer
    from mogelm.parallel.tensor_parallel import apply_tensor_parallel

    cases = [("moge", "moge"), ("moge", "topk"), ("moge", "moge_a2a"), ("topk", "topk"), ("topk", "topk_a2a")]
    for routing, dispatch in cases:
        torch.manual_seed(3)
        cfg = from_name("debug", routing=routing, **cfg_overrides)
        model = Transformer(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (3, 10))
        with torch.no_grad():
            want = model(ids)
            step = torch.randint(0, cfg.vocab_size, (3, 1))
            cache = KVCache(cfg, 3, 16)
            model(ids, positions_BT=torch.arange(10).expand(3, 10), kv_cache=cache)
            want_decode = model(step, positions_BT=torch.full((3, 1), 10), kv_cache=cache)
            apply_tensor_parallel(model, group, dispatch)
            got = model(ids)
            cache = KVCache(model.cfg, 3, 16)  # the local config: this rank's KV heads
            model(ids, positions_BT=torch.arange(10).expand(3, 10), kv_cache=cache)
            got_decode = model(step, positions_BT=torch.full((3, 1), 10), kv_cache=cache)
        _check(errors, f"{name} {routing}/{dispatch} logits", got, want)
        _check(errors, f"{name} {routing}/{dispatch} cached decode", got_decode, want_decode)


def _fused_cases(errors, name, group):
    """Shard, then fuse (the Engine's order on CUDA): FusedQKV / FusedSwiGLU over this rank's slices
    give one process's logits; a model fused first is refused, not mis-sharded."""
    from mogelm.inference.fuse import fuse_for_inference, is_fused
    from mogelm.model import KVCache, Transformer
    from mogelm.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(4)
    cfg = from_name("debug")
    model = Transformer(cfg).eval()
    ids, step = torch.randint(0, cfg.vocab_size, (2, 9)), torch.randint(0, cfg.vocab_size, (2, 1))
    with torch.no_grad():
        want = model(ids)
        cache = KVCache(cfg, 2, 16)
        model(ids, positions_BT=torch.arange(9).expand(2, 9), kv_cache=cache)
        want_decode = model(step, positions_BT=torch.full((2, 1), 9), kv_cache=cache)
        fuse_for_inference(apply_tensor_parallel(model, group))
        if not is_fused(model) or model.layers[0].mlp.shared_expert.gate_up.weight.shape[0] != \
                2 * cfg.shared_expert_intermediate_size // 2:
            errors.append(f"{name}: the sharded model was not fused over its slices")
        got = model(ids)
        cache = KVCache(model.cfg, 2, 16)
        model(ids, positions_BT=torch.arange(9).expand(2, 9), kv_cache=cache)
        got_decode = model(step, positions_BT=torch.full((2, 1), 9), kv_cache=cache)
    _check(errors, f"{name} sharded then fused: logits", got, want)
    _check(errors, f"{name} sharded then fused: cached decode", got_decode, want_decode)
    try:
        apply_tensor_parallel(fuse_for_inference(Transformer(cfg)), group)
        errors.append(f"{name}: a fused model was sharded")
    except ValueError as e:
        if "is fused" not in str(e):
            errors.append(f"{name}: fused model refused with {e}")


def _all_checks(rank, world, tmp, errors, ckpt2, ckpt4, ckpt_mtp):
    from mogelm.checkpoint import from_pretrained

    _init(rank, world, tmp)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    pair_controls = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    control = dist.new_group(backend="gloo")
    pair, pair_control, leader = pairs[rank // 2], pair_controls[rank // 2], rank % 2 == 0

    _forward_cases(errors, "2 ranks", pair, {})
    _forward_cases(errors, "4 ranks", dist.group.WORLD, dict(num_heads=8, num_kv_heads=4))
    _fused_cases(errors, "2 ranks", pair)
    # an MTP checkpoint: the trunk is served (its MTP modules dropped), as one process serves it
    for path, group, n in ((ckpt2, pair, 2), (ckpt4, dist.group.WORLD, 4), (ckpt_mtp, pair, 2)):
        torch.manual_seed(5)  # the same tokens on every rank
        ids = torch.randint(0, 400, (2, 9))
        with torch.no_grad():
            sharded = load_sharded(path, sharder(group))
            _check(errors, f"load_sharded at {n} ranks ({Path(path).parent.name})", sharded(ids),
                   from_pretrained(path)(ids))
        if sharded.mtp is not None or sharded.cfg.mtp_depth:
            errors.append(f"{path}: the sharded model kept its MTP modules")

    _lockstep_round(errors, "4 ranks", ckpt4, dist.group.WORLD, control, rank == 0)
    _lockstep_round(errors, f"pair {rank // 2}", ckpt2, pair, pair_control, leader)

    # The follower of pair 1 dies while its leader is idle: the leader's heartbeat must notice.
    if rank < 2:
        return
    from mogelm.inference.chat import Tokenizer
    from mogelm.inference.distributed import LockstepEngine

    failures = []
    engine = LockstepEngine(load_sharded(ckpt2, sharder(pair)), Tokenizer.from_dir(ckpt2), pair_control,
                            heartbeat_s=0.2, on_failure=lambda e, r, w: failures.append(str(e)), max_batch=2)
    if rank == 3:
        torch.save(errors, os.path.join(tmp, f"errors{rank}.pt"))
        os._exit(0)  # dies without a word
    deadline = time.monotonic() + 20
    while not failures and time.monotonic() < deadline:
        time.sleep(0.1)
    if not failures:
        errors.append("the leader did not notice its dead follower within 20 s")
    engine._closed = True  # stop the heartbeat thread


def test_tensor_parallel_and_lockstep_engine_equal_one_process(tmp_path, ckpt, ckpt4, ckpt_mtp):
    results = _spawn(_all_checks, tmp_path, world=4, timeout=300, args=(str(ckpt), str(ckpt4), str(ckpt_mtp)))
    _assert_clean(results)


# Pure checks -----------------------------------------------------------------------------------------
def test_lockstep_engine_overrides_keep_the_engine_signatures():
    """Every Engine method the lockstep engine overrides takes the same arguments. The CUDA-only
    `_blocks_for_memory` once fell behind (the engine grew a layer-count argument for the MTP layer)
    and every `--nproc` start on a GPU failed with a TypeError that no CPU test reached."""
    import inspect

    from mogelm.inference.distributed import LockstepEngine

    own = [n for n, f in vars(LockstepEngine).items()
           if callable(f) and hasattr(Engine, n) and n != "__init__"]
    assert "_blocks_for_memory" in own and "step" in own
    for name in own:
        want = list(inspect.signature(getattr(Engine, name)).parameters)
        assert list(inspect.signature(getattr(LockstepEngine, name)).parameters) == want, name


def test_layout_checks_name_what_does_not_divide():
    from mogelm.parallel.tensor_parallel import resolve_dispatch, shard_slice, validate_tp

    cfg = from_name("pangu-pro-moe-72b")
    for n in (1, 2, 4, 8):
        validate_tp(cfg, n)
    with pytest.raises(ValueError, match="num_kv_heads"):
        validate_tp(cfg, 16)
    with pytest.raises(ValueError, match="num_kv_heads .2."):
        validate_tp(from_name("debug"), 4)
    with pytest.raises(ValueError, match="needs MoGE routing"):
        resolve_dispatch(from_name("debug", routing="topk"), "moge")
    assert resolve_dispatch(from_name("debug", routing="topk"), "auto") == "topk"
    # Pangu at 4 ranks: 10 of 40 query heads, 2 of 8 KV heads, 16 of 64 experts, 1344 of 5376 shared
    assert shard_slice("layers.0.self_attn.q_proj.weight", cfg, 1, 4) == (0, 1280, 1280)
    assert shard_slice("layers.0.self_attn.k_proj.bias", cfg, 3, 4) == (0, 768, 256)
    assert shard_slice("layers.0.self_attn.o_proj.weight", cfg, 1, 4) == (1, 1280, 1280)
    assert shard_slice("layers.0.self_attn.o_proj.bias", cfg, 1, 4) is None
    assert shard_slice("layers.0.mlp.experts.gate_up_EFD", cfg, 2, 4) == (0, 32, 16)
    assert shard_slice("layers.0.mlp.shared_expert.down_proj.weight", cfg, 1, 4) == (1, 1344, 1344)
    assert shard_slice("layers.0.mlp.shared_expert.up_proj.weight", cfg, 1, 4) == (0, 1344, 1344)
    for replicated in ("embed_tokens.weight", "lm_head.weight", "layers.0.mlp.gate.weight",
                       "layers.0.mlp.router_scale", "layers.0.input_layernorm.weight", "norm.weight"):
        assert shard_slice(replicated, cfg, 1, 4) is None


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2", "--ep", "1"], "--ep 1 must equal --nproc 2"),
    (["--nproc", "4"], "4 ranks do not divide num_kv_heads (2)"),
    (["--nproc", "2", "--quantize", "fp8"], "--quantize with --nproc > 1"),
    (["--nproc", "0"], "must be positive"),
])
def test_bad_multi_process_flags_are_one_line_errors(ckpt, capsys, argv, message):
    for command in (["serve", "--model", str(ckpt)], ["generate", "--model", str(ckpt), "--prompt", "x"]):
        assert cli_main(command + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_random_weights_with_nproc_is_a_one_line_error(capsys):
    assert cli_main(["serve", "--random-weights", "debug", "--nproc", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --random-weights serves one GPU") and err.count("\n") == 1, err
    assert "bench_serve_multi_gpu.py" in err


# The real CLI under torchrun -------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


class _Server:
    def __init__(self, ckpt: Path):
        import httpx  # the serve extra's client side; imported here so the gpu test runs without it
        import openai

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mogelm", "serve", "--model", str(ckpt), "--nproc", "2", "--ep", "2",
             "--port", str(self.port), "--served-model-name", MODEL, "--max-batch", "4", "--chunk-size", "16",
             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "the 2-process server did not come up"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server2(ckpt):
    server = _Server(ckpt)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def solo(ckpt):
    torch.set_num_threads(1)
    return Engine.from_pretrained(ckpt, max_batch=1)


def _greedy(solo, prompt, max_tokens, **kw) -> str:
    return solo.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0].text


def test_two_process_server_answers_like_one_process(server2, solo):
    c = server2.client
    for prompt in ("The quick", "def add(a"):
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == _greedy(solo, prompt, 12)
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    messages = [{"role": "user", "content": "Servers answer"}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt = solo.tokenizer.apply_chat_template(messages)
    want = _greedy(solo, prompt, 10, stop_token_ids=solo.tokenizer.chat_stop_token_ids())
    assert chat.choices[0].message.content == want
    streamed = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == want

    # 8 concurrent requests over 4 sequences (queueing, continuous batching): each as alone
    prompts = [f"{w} {i}" for i, w in enumerate(["The quick", "def add", "for i", "so every"] * 2)]

    def ask(p):
        return c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == [_greedy(solo, p, 8) for p in prompts]


def test_generate_nproc_2_prints_what_one_process_generates(ckpt, solo):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    prompts = ["The quick", "for i in"]
    two = subprocess.run([sys.executable, "-m", "mogelm", "generate", "--model", str(ckpt), "--prompt",
                          prompts[0], "--prompt", prompts[1], "--max-tokens", "10", "--temperature", "0",
                          "--json", "--nproc", "2"], env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr
    want = solo.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    assert [(o["text"], o["token_ids"]) for o in json.loads(two.stdout)] == [(w.text, w.token_ids)
                                                                             for w in want]


def test_a_killed_rank_ends_the_server_with_a_message(server2):
    """Runs last on the module's server: rank 1 is killed; the whole job ends with `error:` lines
    naming what failed, and no process is left."""
    workers = [p for p in _descendants(server2.proc.pid) if _rank_of(p) is not None]
    assert sorted(_rank_of(p) for p in workers) == [0, 1]
    stream = server2.client.completions.create(model=MODEL, prompt="The quick", max_tokens=200, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    next(stream)
    os.kill(next(p for p in workers if _rank_of(p) == 1), signal.SIGKILL)

    def drain():  # the stream ends one way or another once the server is gone
        try:
            for _ in stream:
                pass
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=drain, daemon=True).start()
    status = server2.proc.wait(timeout=60)
    err = server2.proc.stderr.read()
    assert status != 0
    # whoever noticed first: torchrun (rank 1 died) or rank 0 (its next collective failed, its own
    # `error:` line above); the launcher's last line names that rank
    assert err.rstrip().splitlines()[-1].startswith(("error: worker rank 1", "error: worker rank 0")), err
    if "worker rank 0" in err.splitlines()[-1]:
        assert "failed on rank 0/2: a peer rank probably died" in err, err
    assert "Traceback" not in err
    time.sleep(0.5)
    assert [p for p in workers if Path(f"/proc/{p}").exists()] == []


def test_multi_gpu_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/bench_serve_multi_gpu.py --smoke under torchrun with 2 gloo ranks: every routing
    at every point, MoGE's per-rank rows exactly balanced, top-k's not better than balanced."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "benchmarks" / "bench_serve_multi_gpu.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", str(script), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "bench_serve_multi_gpu_2gpu_smoke.json").read_text())
    rows = res["summary"]
    assert {(r["routing"], r["batch"]) for r in rows} == {(k, b) for k in ("moge", "topk", "topk_a2a")
                                                         for b in (1, 4)}
    assert all(r["step_ms"] > 0 and r["tokens_s_per_gpu"] > 0 and r["comm_ms_max"] > 0 for r in rows)
    assert all(r["rows_busiest_over_mean"] == 1.0 for r in rows if r["routing"] == "moge")
    assert all(r["rows_busiest_over_mean"] >= 1.0 for r in rows)
    assert all(r["moge_speedup_vs_best_topk"] > 0 for r in rows if r["routing"] == "moge")
    assert set(res["comm_floor"]) == {"1", "4"} and len(res["per_rank"]) == 2 and res["fused"] is True
    # the simulator's calibration rows (mogelm.sim.calibrate's "collectives" format)
    [coll] = res["collectives"]
    assert coll["world"] == 2 and coll["bytes"] == 4 * 64 * 4  # B = 4 rows of hidden 64, fp32
    assert coll["allgather_ms"] > 0 and coll["reducescatter_ms"] > 0
    assert "| routing | mode |" in run.stdout


@pytest.mark.gpu
def test_gpu_graphed_decode_with_nccl_all_reduces_equals_the_plain_engine(tmp_path, ckpt):
    """One GPU, a one-rank NCCL group (the degenerate case of `--nproc N`): the tensor-parallel model,
    its all-reduces inside the engine's CUDA graphs, decodes like the plain engine. fp32: in bf16 the
    sharded layers' different rounding order (bias after the all-reduce) flipped a greedy choice of
    the debug model at the 4th token (H200, 2026-12-02)."""
    from mogelm.inference.chat import Tokenizer
    from mogelm.inference.distributed import LockstepEngine
    from mogelm.inference.fuse import is_fused

    prompts = ["The quick", "def add(a", "for i in", "Servers answer"]
    params = SamplingParams(max_tokens=16, temperature=0)
    kw = dict(max_batch=4, gpu_memory_fraction=0.05)
    plain = Engine.from_pretrained(ckpt, device="cuda", dtype=torch.float32, **kw)
    want = [c.token_ids for c in plain.generate(prompts, params)]
    del plain
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        control = dist.new_group(backend="gloo")
        model = load_sharded(ckpt, sharder(dist.group.WORLD), "cuda", torch.float32)
        engine = LockstepEngine(model, Tokenizer.from_dir(ckpt), control, **kw)
        assert engine.graphs is not None and sorted(engine.graphs.graphs) == [1, 2, 4]
        assert is_fused(model)  # the engine fuses the sharded model on CUDA, as the plain one
        got = [c.token_ids for c in engine.generate(prompts, params)]
        engine.close()
    finally:
        dist.destroy_process_group()
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("nproc", [2, 4])
def test_gpu_generate_nproc_on_several_gpus_equals_one_gpu(nproc, ckpt, ckpt4):
    """`mogelm generate --nproc N` on N GPUs (NCCL, the engine's CUDA graphs and fusions over each
    rank's shard) prints one GPU's greedy tokens; fp32, so the all-reduces' summation order cannot
    flip a greedy choice of the trained debug models. Skipped where fewer than N GPUs exist."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    path = ckpt if nproc == 2 else ckpt4  # 2 / 4 KV heads
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    prompts = ["The quick", "for i in", "def add(a"]
    argv = [sys.executable, "-m", "mogelm", "generate", "--model", str(path), "--max-tokens", "16",
            "--temperature", "0", "--json", "--device", "cuda", "--dtype", "float32",
            "--gpu-memory-fraction", "0.3", "--nproc", str(nproc)]
    for p in prompts:
        argv += ["--prompt", p]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    one = Engine.from_pretrained(path, device="cuda", dtype=torch.float32, max_batch=4,
                                 gpu_memory_fraction=0.05)
    want = one.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    assert [o["token_ids"] for o in json.loads(run.stdout)] == [w.token_ids for w in want]
