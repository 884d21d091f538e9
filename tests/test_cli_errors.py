"""Every `mogelm` command refuses bad input the same way: exit status 2, exactly one `error:` line
on stderr that names the problem, no traceback, and nothing left behind (the file tree under the
test's folders, cache included, is the same before and after). The table has a row per command x
bad input (issue 12's list and the inputs handled before it); a command added to cli.COMMANDS
without rows fails test_every_command_has_bad_inputs, so it inherits the check.

Cases run in-process (cli.main, fast); `mogelm train --nproc` is also run as a subprocess, to
show that SIGTERM or SIGKILL of the parent leaves no torchrun or worker process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mogelm import cli, save_pretrained
from mogelm.cli import COMMANDS
from mogelm.config import from_name
from mogelm.model import Transformer
from mogelm.train import TrainConfig

DATA = str(Path(__file__).parent / "data")
BENCH = str(Path(__file__).parent / "data" / "sim_bench_h200.json")

# command -> [(case id, argv after the command, text the error line must contain)]. Placeholders:
# {ckpt} a debug checkpoint; {bad_str}/{bad_list}/{conflict}/{trunc} broken copies of it (a string
# where a number belongs, a JSON list, HF num_experts against the "mogelm" section, weights cut
# short); {run} a training run with a checkpoint; {file} an ordinary file; {dir} an empty folder;
# {binary} binary data named .txt; {work} the current folder (where default outputs would go).
TRAIN = ["--preset", "debug", "--data", DATA, "--seq-len", "32", "--max-steps", "2"]
CASES: dict[str, list[tuple[str, list[str], str]]] = {
    "train": [
        ("max-steps-negative", [*TRAIN, "--max-steps", "-1"], "--max-steps must be positive"),
        ("no-length", ["--preset", "debug", "--data", DATA], "give --max-steps or --max-tokens"),
        ("lr-negative", [*TRAIN, "--lr", "-1"], "--lr must be a positive number"),
        ("save-every-0", [*TRAIN, "--save-every", "0"], "--save-every must be positive"),
        ("eval-every-0", [*TRAIN, "--eval-every", "0"], "--eval-every must be positive"),
        ("save-every-negative", [*TRAIN, "--save-every", "-5"], "--save-every must be positive"),
        ("threads-negative", [*TRAIN, "--threads", "-2"], "--threads must be 0 or more"),
        ("seq-len-0", [*TRAIN, "--seq-len", "0"], "--seq-len must be positive"),
        ("out-is-file", [*TRAIN, "--out", "{file}"], "is a file, not a folder"),
        ("out-under-file", [*TRAIN, "--out", "{file}/sub"], "is a file, so no folder"),
        ("data-missing", [*TRAIN, "--data", "{work}/missing.txt"], "no such file"),
        ("data-binary", [*TRAIN, "--data", "{binary}"], "is not UTF-8 text"),
        ("data-suffix", [*TRAIN, "--data", BENCH], "unsupported file type"),
        ("preset-unknown", [*TRAIN, "--preset", "huge"], "unknown preset"),
        ("vocab-too-small", [*TRAIN, "--vocab-size", "100"], "too small"),
        ("device-tpu", [*TRAIN, "--device", "tpu"], "is not a device"),
        ("nproc-0", [*TRAIN, "--nproc", "0"], "--nproc and --ep must be positive"),
        ("ep-above-nproc", [*TRAIN, "--nproc", "2", "--ep", "3"], "--ep 3 needs --nproc 3 or more"),
        ("ep-not-dividing-nproc", [*TRAIN, "--nproc", "4", "--ep", "3"], "--ep 3 must divide --nproc 4"),
        ("ep-not-dividing-groups", [*TRAIN, "--nproc", "3", "--ep", "3"], "does not divide num_groups"),
        ("ep-without-nproc", [*TRAIN, "--ep", "2"], "--ep 2 needs --nproc 2 or more"),
        ("existing-run", [*TRAIN, "--out", "{run}"], "pass --resume"),
        ("resume-routing", ["--out", "{run}", "--resume", "--routing", "topk"], "--routing moge -> topk"),
        ("resume-preset", ["--out", "{run}", "--resume", "--preset", "small"], "--preset debug -> small"),
        ("resume-model-flag", ["--out", "{run}", "--resume", "--aux-alpha", "0.5"],
         "--aux-alpha 0.001 -> 0.5"),
        ("resume-lr", ["--out", "{run}", "--resume", "--lr", "1e-3"], "--allow-changed-optimizer"),
        ("resume-batch", ["--out", "{run}", "--resume", "--batch-size", "4"], "sequences per step) 8 -> 4"),
        ("resume-seq-len", ["--out", "{run}", "--resume", "--seq-len", "512", "--allow-changed-optimizer"],
         "exceeds the checkpoint's model context"),
        ("nproc-not-a-number", [*TRAIN, "--nproc", "two"], "invalid int value"),  # argparse's own
    ],
    "compare": [
        ("runs-dir-is-file", ["--runs-dir", "{file}", "--preset", "debug"], "is a file, not a folder"),
        ("save-every-0", ["--preset", "debug", "--data", DATA, "--save-every", "0"], "--save-every must be"),
        ("eval-every-0", ["--preset", "debug", "--data", DATA, "--eval-every", "0"], "--eval-every must be"),
        ("lr-negative", ["--preset", "debug", "--data", DATA, "--lr", "-1"], "--lr must be"),
        ("max-steps-0", ["--preset", "debug", "--max-steps", "0"], "--max-steps must be positive"),
        ("jobs-3", ["--preset", "debug", "--jobs", "3"], "--jobs must be 1 or 2"),
        ("threads-negative", ["--preset", "debug", "--threads", "-1"], "--threads must be 0"),
        ("device-tpu", ["--preset", "debug", "--device", "tpu"], "is not a device"),
        ("existing", ["--runs-dir", "{work}/runs", "--name", "old"], "already exists; pass --resume"),
    ],
    "eval": [
        ("not-a-checkpoint", ["--model", "{dir}"], "is not a checkpoint directory: config.json not found"),
        ("missing", ["--model", "{work}/nope"], "no such checkpoint directory"),
        ("config-string", ["--model", "{bad_str}"], "hidden_size must be an integer, got \"64\""),
        ("config-list", ["--model", "{bad_list}"], "holds a JSON list, not an object"),
        ("config-conflict", ["--model", "{conflict}"], "num_experts is 16 but the \"mogelm\" section says"),
        ("device-cuda", ["--model", "{ckpt}", "--device", "cuda"], "CUDA is not available"),
        ("device-tpu", ["--model", "{ckpt}", "--device", "tpu"], "is not a device"),
        ("seq-len-beyond-context", ["--model", "{ckpt}", "--seq-len", "100000"],
         "exceeds the model's context"),
        ("max-batches-negative", ["--model", "{ckpt}", "--max-batches", "-1"], "--max-batches must be"),
        ("batch-size-0", ["--model", "{ckpt}", "--batch-size", "0"], "--batch-size must be positive"),
        ("data-binary", ["--model", "{ckpt}", "--data", "{binary}"], "is not UTF-8 text"),
        ("truncated", ["--model", "{trunc}", "--data", DATA], "the checkpoint is corrupt"),
    ],
    "generate": [
        ("config-list", ["--model", "{bad_list}", "--prompt", "x"], "holds a JSON list"),
        ("config-string", ["--model", "{bad_str}", "--prompt", "x"], "must be an integer"),
        ("device-cuda", ["--model", "{ckpt}", "--prompt", "x", "--device", "cuda"], "CUDA is not available"),
        ("device-tpu", ["--model", "{ckpt}", "--prompt", "x", "--device", "tpu"], "is not a device"),
        ("top-k-negative", ["--model", "{ckpt}", "--prompt", "x", "--top-k", "-3"], "--top-k must be"),
        ("threads-negative", ["--model", "{ckpt}", "--prompt", "x", "--threads", "-1"], "--threads must be"),
        ("max-batch-0", ["--model", "{ckpt}", "--prompt", "x", "--max-batch", "0"], "--max-batch must be"),
        ("max-tokens-negative", ["--model", "{ckpt}", "--prompt", "x", "--max-tokens", "-1"], "max_tokens"),
        ("missing", ["--model", "{work}/nope", "--prompt", "x"], "does not exist"),
    ],
    "serve": [
        ("config-list", ["--model", "{bad_list}"], "holds a JSON list"),
        ("config-string", ["--model", "{bad_str}"], "must be an integer"),
        ("device-cuda", ["--model", "{ckpt}", "--device", "cuda"], "CUDA is not available"),
        ("device-tpu", ["--model", "{ckpt}", "--device", "tpu"], "is not a device"),
        ("max-len-beyond-model", ["--model", "{ckpt}", "--max-len", "100000"], "exceeds the model's context"),
        ("port-out-of-range", ["--model", "{ckpt}", "--port", "70000"], "--port must be in"),
        ("threads-0", ["--model", "{ckpt}", "--threads", "0"], "--threads must be positive"),
        ("max-len-0", ["--model", "{ckpt}", "--max-len", "0"], "--max-len must be positive"),
        ("speculative-mtp-without-mtp", ["--model", "{ckpt}", "--speculative", "mtp"], "has no MTP modules"),
        ("speculative-with-nproc", ["--model", "{ckpt}", "--speculative", "ngram", "--nproc", "2", "--device",
                                    "cpu"], "--speculative with --nproc > 1 is not supported"),
        ("draft-tokens-0", ["--model", "{ckpt}", "--speculative", "ngram", "--draft-tokens", "0"],
         "--draft-tokens must be at least 1"),
    ],
    "bench": [
        ("timeout-0", ["serve", "--timeout", "0"], "--timeout must be a positive number"),
        ("deadline-negative", ["serve", "--deadline", "-1"], "--deadline must be"),
        ("not-loopback", ["serve", "--url", "http://192.0.2.1:8000"], "not loopback"),
        ("bad-url", ["serve", "--url", "ftp://127.0.0.1"], "--url must look like"),
        ("concurrency-0", ["serve", "--concurrency", "0"], "--concurrency must be positive"),
        ("nobody-listening", ["serve", "--url", "http://127.0.0.1:{free_port}", "--timeout", "5"],
         "cannot reach"),
    ],
    "sim": [
        ("config-string", ["--model", "{bad_str}/config.json"], "must be an integer"),
        ("config-list", ["--model", "{bad_list}/config.json"], "holds a JSON list"),
        ("config-conflict", ["--model", "{conflict}"], "num_experts is 16"),
        ("hardware-not-json", ["--hardware", "{file}"], "{file} is not valid JSON"),
        ("hardware-list", ["--hardware", "{bad_list}/config.json"], "config.json: a hardware profile is a"),
        ("hardware-fields", ["--hardware", "{ckpt}/config.json"], "config.json: unknown hardware profile"),
        ("hardware-unknown", ["--hardware", "no-such-npu"], "unknown hardware"),
        ("prefill-batch-negative", ["--prefill-batch", "-2"], "--prefill-batch must be 0"),
        ("cards-0", ["--cards", "0"], "--cards must be at least 1"),
        ("plot-missing-folder", ["search", "--quick", "--plot", "{work}/nodir/fig.png"], "does not exist"),
        ("plot-is-folder", ["search", "--quick", "--plot", "{dir}"], "is a folder"),
        ("calibrate-out-dir", ["calibrate", BENCH, "--out", "{dir}"], "--out {dir} is a folder"),
        ("calibrate-no-file", ["calibrate", "--out", "{work}/p.json"], "calibrate needs the benchmark JSON"),
        ("layout", ["--layout", "2x2"], "--layout '2x2' must look like"),
        ("targets", ["search", "--targets", "ascend-800i-a2:four:50"], "CARDS must be an integer"),
    ],
    "imbalance": [
        ("groups-0", ["--groups", "0"], "--groups must be positive"),
        ("experts-0", ["--experts", "0"], "--experts must be positive"),
        ("top-k-above-experts", ["--experts", "8", "--groups", "8", "--top-k", "9"], "exceeds --experts 8"),
        ("too-large", ["--tokens", "100000000", "--trials", "100000000"], "GiB per simulated batch"),
        ("uneven-groups", ["--experts", "10", "--groups", "4"], "must be divisible by --groups"),
        ("moge-top-k", ["--experts", "64", "--groups", "8", "--top-k", "4"], "MoGE needs top-k"),
    ],
    "quantize": [
        ("weights-unknown", ["{ckpt}", "{work}/q", "--weights", "int4"], "--weights 'int4' is not supported"),
        ("input-not-a-checkpoint", ["{dir}", "{work}/q", "--weights", "fp8"], "config.json not found"),
        ("input-missing", ["{work}/missing", "{work}/q", "--weights", "fp8"],
         "is not a checkpoint directory"),
        ("output-exists", ["{ckpt}", "{dir}", "--weights", "fp8"], "already exists"),
        ("output-under-file", ["{ckpt}", "{file}/q", "--weights", "fp8"], "does not exist"),
        ("config-string", ["{bad_str}", "{work}/q", "--weights", "fp8"], "hidden_size must be an integer"),
        ("truncated", ["{trunc}", "{work}/q", "--weights", "fp8"], "the checkpoint is corrupt"),
        ("device-cuda", ["{ckpt}", "{work}/q", "--weights", "fp8", "--device", "cuda"], "no CUDA device"),
    ],
    "info": [
        ("unknown", ["no-such-preset"], "is neither a preset"),
        ("config-string", ["{bad_str}"], "hidden_size must be an integer"),
        ("config-list", ["{bad_list}"], "holds a JSON list"),
        ("config-conflict", ["{conflict}"], "num_experts is 16"),
        ("truncated", ["{trunc}"], "is truncated: its header needs"),
        ("not-a-checkpoint", ["{dir}"], "config.json not found"),
    ],
}


def test_every_command_has_bad_inputs():
    assert set(CASES) == set(COMMANDS), "add rows for a new command to CASES"


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict:
    """The fixtures the table's placeholders name, built once (a debug model, untrained)."""
    root = tmp_path_factory.mktemp("errors")
    ckpt = root / "ckpt"
    torch.manual_seed(0)
    save_pretrained(Transformer(from_name("debug")), ckpt)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["some text to learn a few merges from"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(ckpt / "tokenizer.json"))
    p = {"ckpt": ckpt}
    for name in ("bad_str", "bad_list", "conflict", "trunc"):
        p[name] = root / name
        shutil.copytree(ckpt, p[name])
    hf = json.loads((ckpt / "config.json").read_text())
    bad_str = {**hf, "mogelm": {**hf["mogelm"], "hidden_size": "64"}}
    (p["bad_str"] / "config.json").write_text(json.dumps(bad_str))
    (p["bad_list"] / "config.json").write_text(json.dumps([hf]))
    (p["conflict"] / "config.json").write_text(json.dumps({**hf, "num_experts": 16}))
    weights = p["trunc"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # a training run with one checkpoint (its files are what --resume reads before anything else)
    run = root / "run"
    step = run / "checkpoint-000002"
    step.mkdir(parents=True)
    shutil.copy(ckpt / "config.json", step / "config.json")
    (step / "trainer_state.pt").write_bytes(b"")  # never read: every case is refused before it
    tc = TrainConfig(out=str(run), preset="debug", data=[DATA], seq_len=32, max_steps=2)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "train_config": tc.to_dict(),
                                                         "world_size": 1}))
    p["run"] = run
    p["file"] = root / "a_file"
    p["file"].write_text("not a folder\n")
    p["dir"] = root / "empty_dir"
    p["dir"].mkdir()
    p["binary"] = root / "blob.txt"
    p["binary"].write_bytes(bytes(range(256)) * 64)
    p["work"] = root / "work"
    (p["work"] / "runs" / "old").mkdir(parents=True)
    (p["work"] / "runs" / "old" / "report.md").write_text("an earlier comparison\n")
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on (released at once)
        s.bind(("127.0.0.1", 0))
        p["free_port"] = s.getsockname()[1]
    p["root"] = root
    return p


def _tree(*roots: Path) -> dict:
    return {str(f): (f.is_dir(), 0 if f.is_dir() else f.stat().st_size)
            for r in roots for f in sorted(r.rglob("*"))}


ROWS = [(cmd, case, argv, expect) for cmd, rows in CASES.items() for case, argv, expect in rows]


@pytest.mark.parametrize("command, case, argv, expect", ROWS, ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_bad_input_is_one_error_line_exit_2_nothing_written(command, case, argv, expect, places, capsys,
                                                            monkeypatch):
    if "CUDA is not available" in expect and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fill = lambda s: s.format(**{k: str(v) for k, v in places.items()})
    cache = places["root"] / "cache"
    monkeypatch.chdir(places["work"])
    monkeypatch.setenv("MOGELM_CACHE", str(cache))
    threads = torch.get_num_threads()
    before = _tree(places["root"])
    try:
        status = cli.main([command, *map(fill, argv)])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert fill(expect) in error_lines[0], err
    assert _tree(places["root"]) == before, "files were left behind"


def _ppid_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _ppid_map(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_to_nproc_parent_leaves_no_process(tmp_path, sig):
    """`mogelm train --nproc 2` killed: torchrun and both workers are gone within seconds, whether
    the parent forwards the signal (SIGTERM, sent while the workers train, inside collectives) or
    dies at once (SIGKILL, sent as soon as the workers exist: PR_SET_PDEATHSIG takes them down)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mogelm", "train", "--nproc", "2", "--preset", "debug", "--data", DATA,
           "--cache-dir", str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2",
           "--max-steps", "100000", "--eval-every", "100000", "--save-every", "100000", "--threads", "1",
           "--device", "cpu", "--progress", "none", "--out", str(out)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=f)
    tree: list[int] = []

    def ready() -> bool:
        if sig == signal.SIGTERM:
            return (out / "log.jsonl").is_file() and bool((out / "log.jsonl").read_text().strip())
        return len(_descendants(proc.pid)) >= 3

    try:
        t0 = time.time()
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 180, "the workers did not start"
            time.sleep(0.1)
        tree = _descendants(proc.pid)
        assert len(tree) >= 3, tree  # torchrun and its two workers
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
        t1 = time.time()
        while any(_alive(p) for p in tree) and time.time() - t1 < 30:
            time.sleep(0.1)
        left = [p for p in tree if _alive(p)]
        assert left == [], f"still running {time.time() - t1:.0f} s after the parent ended: {left}"
        assert status == (128 + sig if sig != signal.SIGKILL else -sig)
        if sig == signal.SIGTERM:
            assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in tree:  # only if the test failed: none of the processes it started keeps running
            try:
                if _alive(p) and b"mogelm" in Path(f"/proc/{p}/cmdline").read_bytes() + \
                        Path(f"/proc/{p}/environ").read_bytes():
                    os.kill(p, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.distributed
def test_torchrun_wrapper_turns_a_failed_worker_into_its_exit_status():
    """`python -m mogelm.parallel.launch` is torchrun without its traceback banner: a worker's exit
    status comes back with one `error:` line naming the rank (none for status 2, whose worker has
    printed its own)."""
    base = [sys.executable, "-m", "mogelm.parallel.launch", "--standalone", "--nproc-per-node=1",
            "--no-python"]
    failed = subprocess.run([*base, "sh", "-c", "exit 3"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 3 and "Traceback" not in failed.stderr, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: worker rank 0 of sh failed with exit status 3 (its output is above); every "
                      "worker was stopped"], failed.stderr
    quiet = subprocess.run([*base, "sh", "-c", "echo 'error: said by the worker' >&2; exit 2"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr
    assert [line for line in quiet.stderr.splitlines() if "error:" in line] == ["error: said by the worker"]
