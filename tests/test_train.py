"""mogelm train / eval: the loss falls, resume (also after kill -9) continues the same curve,
reload gives the same eval loss, and bad input ends with a clear message and nothing overwritten;
the pieces of the mogelm.train package (config, loop on one process, checkpointing, logs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mogelm import cli
from mogelm.checkpoint import from_pretrained
from mogelm.errors import UserError
from mogelm.evaluate import evaluate_batches
from mogelm.train import TrainConfig, lr_at, read_log, sample_ids, train, val_batches
from mogelm.train.checkpointing import find_checkpoints, prune_checkpoints
from mogelm.train.logs import JsonlLog

FIXTURES = Path(__file__).parent / "data"
SMALL = dict(preset="debug", seq_len=64, batch_size=4, eval_batches=2, threads=1, data=[str(FIXTURES)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def cfg(tmp_path, cache, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "out": str(tmp_path / "run"), "cache_dir": cache, **kw})


def losses(out, kind="train", key="loss"):
    return [(r["step"], r[key]) for r in read_log(Path(out) / "log.jsonl") if r["kind"] == kind]


def run_cli(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One 60-step debug run shared by the tests below."""
    tmp = tmp_path_factory.mktemp("trained")
    tc = cfg(tmp, cache, max_steps=60, eval_every=20, save_every=20, lr=3e-3)
    return tc, train(tc, log=lambda msg: None)


def test_loss_falls(trained):
    tc, res = trained
    train_curve = [loss for _, loss in losses(tc.out)]
    val_curve = [loss for _, loss in losses(tc.out, "val", "val_loss")]
    assert len(train_curve) == 60 and len(val_curve) == 3
    first, last = sum(train_curve[:5]) / 5, sum(train_curve[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert val_curve[-1] < val_curve[0]
    assert res["final_val"]["val_loss"] == val_curve[-1]
    final = Path(tc.out) / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "trainer_state.pt"):
        assert (final / name).is_file(), name
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 60
    # MoGE with 4 groups on 4 simulated devices: the Imbalance Score is exactly 0 on every step.
    recs = [r for r in read_log(Path(tc.out) / "log.jsonl") if r["kind"] == "train"]
    assert all(v == 0.0 for r in recs for v in r["is4"])


def test_reload_gives_identical_eval_loss(trained, cache):
    tc, res = trained
    model = from_pretrained(Path(tc.out) / "final")
    from mogelm.data import TokenData

    td = TokenData(json.loads((Path(tc.out) / "final" / "trainer_state.json").read_text())["data"])
    again = evaluate_batches(model, val_batches(td, tc))["loss"]
    assert again == res["final_val"]["val_loss"]


def test_eval_cli(trained, capsys):
    tc, res = trained
    status, out, err = run_cli(["eval", "--model", str(Path(tc.out) / "final"), "--data", str(FIXTURES),
                                "--seq-len", "64", "--json"], capsys)
    assert status == 0, err
    result = json.loads(out)
    assert 0 < result["loss"] < 7 and (abs(result["ppl"] - torch.tensor(result["loss"]).exp().item())
                                       < 1e-3 * result["ppl"])
    shares = result["routing_stats"]["expert_share"]
    # K = 4 experts per token
    assert len(shares) == 2 and all(abs(sum(layer) - 4.0) < 1e-9 for layer in shares)
    assert all(v == 0.0 for v in result["routing_stats"]["imbalance"]["4"]["max_per_layer"])


def test_resume_equals_uninterrupted(tmp_path, cache):
    a = cfg(tmp_path / "a", cache, max_steps=24, eval_every=8, save_every=100)
    a.model_overrides = {"aux_free_bias": True, "z_loss_coef": 1e-3}
    train(a, log=lambda msg: None)
    b = cfg(tmp_path / "b", cache, max_steps=24, eval_every=8, save_every=100, stop_after=10)
    b.model_overrides = dict(a.model_overrides)
    assert train(b, log=lambda msg: None)["stopped"]
    b.stop_after, b.resume = 0, True
    train(b, log=lambda msg: None)
    assert losses(a.out) == losses(b.out)
    assert losses(a.out, "val", "val_loss") == losses(b.out, "val", "val_loss")
    ma, mb = from_pretrained(Path(a.out) / "final"), from_pretrained(Path(b.out) / "final")
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert ma.layers[0].mlp.expert_bias_E.abs().sum() > 0  # the aux-free bias moved and was restored


def test_kill_9_loses_only_steps_since_checkpoint(tmp_path, cache):
    args = ["--preset", "debug", "--seq-len", "64", "--batch-size", "4", "--eval-batches", "2",
            "--threads", "1",
            "--data", str(FIXTURES), "--cache-dir", cache, "--max-steps", "100", "--save-every", "5",
            "--eval-every", "1000", "--out", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mogelm", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (not list((tmp_path / "run").glob("checkpoint-000010")) and time.time() < deadline
           and proc.poll() is None):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert ckpts and not (tmp_path / "run" / "final").exists(), "the run finished before it could be killed"
    assert all((c / "trainer_state.pt").is_file() for c in ckpts)  # only complete checkpoints are visible
    killed_at = max(r["step"] for r in read_log(tmp_path / "run" / "log.jsonl"))
    assert cli.main(["train", *args, "--resume"]) == 0
    ref = cfg(tmp_path / "ref", cache, max_steps=100, eval_every=1000, save_every=1000)
    train(ref, log=lambda msg: None)
    assert losses(tmp_path / "run") == losses(ref.out)
    assert killed_at >= 10


def test_schedule_and_sample_slicing():
    tc = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, batch_size=2, grad_accum=2)
    assert lr_at(0, tc, 100) == pytest.approx(0.1) and lr_at(9, tc, 100) == pytest.approx(1.0)
    assert lr_at(100, tc, 100) == pytest.approx(0.1) and lr_at(55, tc, 100) == pytest.approx(0.55)
    # Two ranks together see exactly the rows one process with twice the batch sees.
    one = TrainConfig(batch_size=4, grad_accum=2)
    for step in range(3):
        for micro in range(2):
            both = list(sample_ids(step, micro, tc, 0, 2)) + list(sample_ids(step, micro, tc, 1, 2))
            assert both == list(sample_ids(step, micro, one))


# Bad input: a clear one-line message, exit status 2, no traceback, nothing overwritten ----------------
def _assert_clean_error(status, err, pattern):
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert pattern in err, err


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_corpus_inputs(tmp_path, cache, capsys):
    base = ["train", "--preset", "debug", "--max-steps", "2", "--seq-len", "64", "--cache-dir", cache]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n")
    cases = [
        (["--data", str(tmp_path / "empty")], "corpus is empty"),
        (["--data", str(tmp_path / "missing.txt")], "no such file"),
        (["--data", str(FIXTURES), "--vocab-size", "100"], "too small"),
        (["--data", str(FIXTURES), "--seq-len", "0"], "must be positive"),
        (["--data", str(FIXTURES), "--max-steps", "0"], "--max-steps"),
    ]
    for i, (extra, pattern) in enumerate(cases):
        status, _, err = run_cli([*base, "--out", str(tmp_path / f"o{i}"), *extra], capsys)
        _assert_clean_error(status, err, pattern)
        assert not (tmp_path / f"o{i}").exists()


def test_token_ids_out_of_range(trained, tmp_path, cache, capsys):
    from mogelm import data as D

    tc, _ = trained
    big = D.prepare(D.load_documents([str(FIXTURES)]), vocab_size=1024, cache_dir=cache)
    status, _, err = run_cli(["eval", "--model", str(Path(tc.out) / "final"), "--data", str(FIXTURES),
                              "--tokenizer", str(big.tokenizer_file), "--seq-len", "64"], capsys)
    _assert_clean_error(status, err, "outside the model's vocabulary [0, 512)")


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    import shutil

    tc, _ = trained
    run = tmp_path / "run"
    shutil.copytree(tc.out, run)
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    status, _, err = run_cli(["eval", "--model", str(run / "final"), "--data", str(FIXTURES)], capsys)
    _assert_clean_error(status, err, "corrupt")
    # A corrupt training state: --resume refuses, and touches neither the log nor the checkpoint.
    shutil.rmtree(run)
    shutil.copytree(tc.out, run)
    (run / "final" / "trainer_state.pt").write_bytes(b"\x80garbage")
    before = _snapshot(run)
    status, _, err = run_cli(["train", "--preset", "debug", "--data", str(FIXTURES), "--seq-len", "64",
                              "--out", str(run), "--resume", "--cache-dir", tc.cache_dir], capsys)
    _assert_clean_error(status, err, "trainer_state.pt is unreadable")
    assert _snapshot(run) == before


def test_existing_run_is_not_overwritten(trained, capsys):
    tc, _ = trained
    before = _snapshot(Path(tc.out))
    status, _, err = run_cli(["train", "--preset", "debug", "--data", str(FIXTURES), "--seq-len", "64",
                              "--max-steps", "5", "--out", tc.out, "--cache-dir", tc.cache_dir], capsys)
    _assert_clean_error(status, err, "--resume")
    assert _snapshot(Path(tc.out)) == before


@pytest.mark.parametrize("windows", [1, 7, 8, 13])
def test_validation_batches_have_the_same_shapes_on_every_rank(windows):
    # Expert-parallel validation exchanges equal splits: ranks must see identical batch shapes.
    class FakeData:
        def num_windows(self, split, seq_len):
            return windows

        def num_tokens(self, split):
            return windows * 9

        def batch(self, split, ids, seq_len, seed=0):
            return torch.zeros(len(ids), seq_len), torch.zeros(len(ids), seq_len)

    tc = TrainConfig(batch_size=3, eval_batches=4, seq_len=8)
    if windows < 2:
        with pytest.raises(UserError, match="fewer than the 2 processes"):
            list(val_batches(FakeData(), tc, 0, 2))
        return
    shapes = [[tuple(x.shape) for x, _ in val_batches(FakeData(), tc, r, 2)] for r in range(2)]
    assert shapes[0] == shapes[1] and shapes[0]


# The loop on one process (train/loop.py through train/context.py) ---------------------------------
def test_one_process_loop_equals_a_plain_loop(tmp_path, cache):
    """train() on its world-size-1 context computes exactly what a plain one-process loop does
    (schedule, accumulation, aux loss, torch's clipping, AdamW): the same losses and gradient
    norms, bit for bit, and the same final weights."""
    import torch.nn.functional as F

    from mogelm.train import build_model, build_model_config, build_optimizer, prepare_data, train_batch
    from mogelm.train.context import LocalContext

    tc = cfg(tmp_path, cache, max_steps=3, grad_accum=2, eval_every=100)
    train(tc, log=lambda msg: None)
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in read_log(Path(tc.out) / "log.jsonl")
           if r["kind"] == "train"]

    vocab = build_model_config(tc).vocab_size
    td = prepare_data(tc, vocab, LocalContext(), log=lambda msg: None)
    model = build_model(build_model_config(tc, vocab), tc.seed)
    opt = build_optimizer(model, tc)
    want = []
    for step in range(tc.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc, tc.max_steps)
        ce_sum = 0.0
        for micro in range(tc.grad_accum):
            x_BT, y_BT = train_batch(td, tc, step, micro)
            out = model(x_BT, return_stats=True)
            ce = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), y_BT.reshape(-1))
            ((ce + out.aux_loss) / tc.grad_accum).backward()
            ce_sum += float(ce.detach()) / tc.grad_accum
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append((step + 1, ce_sum, norm))
    assert got == want
    trained_sd = from_pretrained(Path(tc.out) / "final").state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(trained_sd[name], t), name


# Config, checkpointing, logs ---------------------------------------------------------------------------
def test_train_config_round_trips_through_json():
    tc = TrainConfig(preset="debug", routing="topk",
                     model_overrides={"aux_free_bias": True, "z_loss_coef": 1e-3},
                     data=["a.txt"], sim_devices=(4, 2), lr=3e-3, max_steps=7)
    again = TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict())))
    assert again == tc and again.sim_devices == (4, 2)


def test_checkpoints_are_found_in_order_and_pruned(tmp_path):
    for step in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
        (tmp_path / f"checkpoint-{step:06d}" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoint-000025").mkdir()  # no trainer_state.pt: incomplete, ignored
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "final" / "trainer_state.json").write_text('{"step": 30}')
    assert [(s, d.name) for s, d in find_checkpoints(tmp_path)] == [
        (5, "checkpoint-000005"), (10, "checkpoint-000010"), (15, "checkpoint-000015"),
        (20, "checkpoint-000020"), (30, "final")]
    prune_checkpoints(tmp_path, keep=2, before_step=20)  # keep the one just written (20) and one more
    assert [d.name for _, d in find_checkpoints(tmp_path)] == ["checkpoint-000015", "checkpoint-000020",
                                                                "final"]


def test_jsonl_log_on_resume_drops_later_and_cut_records(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "val", "step": 2}\n{"kind": "train", "step": 3}\n'
                    '{"kind": "train", "st')  # the last line cut by a kill
    log = JsonlLog(path, keep_until_step=2, enabled=True)
    log.write({"kind": "train", "step": 3, "loss": 1.5})
    log.close()
    assert read_log(path) == [{"kind": "train", "step": 1}, {"kind": "val", "step": 2},
                              {"kind": "train", "step": 3, "loss": 1.5}]
    JsonlLog(tmp_path / "other.jsonl", keep_until_step=None, enabled=False).write(
        {"kind": "train", "step": 1}
    )
    assert not (tmp_path / "other.jsonl").exists()  # only the main rank writes
