"""Issue 12's behaviours that are not a bad-input error (those are in test_cli_errors.py): resuming
with the checkpoint's settings (flags compared, defaults never counted as changes), the progress
line's IS at the model's own group count and ETA from the resumed step, plot annotations, file
permissions, UTF-8 text, no warnings from one-process DCP, a failed fresh comparison leaving
nothing that blocks the retry, and cli.explicit_options."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from mogelm import cli, save_pretrained
from mogelm.config import from_name
from mogelm.errors import UserError
from mogelm.model import Transformer
from mogelm.train import TrainConfig, read_log
from mogelm.train.checkpointing import resumed_config
from mogelm.train.logs import Progress

DATA = str(Path(__file__).parent / "data")


# Resuming ------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, world_size=1, **kw) -> tuple[Path, TrainConfig]:
    """A checkpoint folder holding what resumed_config reads: trainer_state.json's train_config."""
    tc = TrainConfig(out=str(tmp_path / "run"), preset="debug", data=[DATA], seq_len=32, max_steps=20,
                     lr=1e-3, **kw)
    d = tmp_path / "run" / "checkpoint-000010"
    d.mkdir(parents=True)
    state = {"step": 10, "samples_seen": 10 * tc.batch_size * world_size, "train_config": tc.to_dict()}
    (d / "trainer_state.json").write_text(json.dumps(state))
    return d, tc


def test_resume_takes_the_checkpoints_settings_for_what_was_not_given(tmp_path):
    d, saved = _checkpoint(tmp_path, batch_size=4)
    bare = TrainConfig(out=saved.out, resume=True, threads=1)  # `mogelm train --out RUN --resume`
    tc, changes = resumed_config(d, bare, 1, explicit={"out", "resume", "threads"})
    assert changes == {}
    assert (tc.preset, tc.lr, tc.max_steps, tc.seq_len, tc.batch_size, tc.data) == \
        ("debug", 1e-3, 20, 32, 4, [DATA])
    assert (tc.resume, tc.threads) == (True, 1)  # this invocation's run settings
    # the same values given again are no change; routing "moge" is what the preset's None meant
    same = dataclasses.replace(saved, routing="moge", resume=True)
    assert resumed_config(d, same, 1, explicit={"routing", "lr", "seq_len", "resume"})[1] == {}
    assert resumed_config(d, same, 1, explicit=None)[1] == {}  # a library caller's full config


def test_resume_refuses_model_changes_naming_the_flag(tmp_path):
    d, saved = _checkpoint(tmp_path)
    for field, value, shown in [("routing", "topk", "--routing moge -> topk"),
                                ("preset", "small", "--preset debug -> small"),
                                ("vocab_size", 1024, "--vocab-size 512 -> 1024"),
                                ("data", ["elsewhere.txt"], "--data"),
                                ("model_overrides", {"aux_loss_alpha": 0.5}, "--aux-alpha 0.001 -> 0.5")]:
        new = dataclasses.replace(saved, resume=True, **{field: value})
        with pytest.raises(UserError, match="another model") as e:
            resumed_config(d, new, 1, explicit={field}, allow_changed_optimizer=True)  # never allowed
        assert shown in str(e.value)


def test_resume_optimizer_changes_need_the_flag_and_are_returned(tmp_path):
    d, saved = _checkpoint(tmp_path, batch_size=4)
    new = dataclasses.replace(saved, lr=5e-4, max_steps=40, resume=True)
    with pytest.raises(UserError, match="--lr 0.001 -> 0.0005; --max-steps 20 -> 40; pass "
                                        "--allow-changed-optimizer"):
        resumed_config(d, new, 1, explicit={"lr", "max_steps"})
    tc, changes = resumed_config(d, new, 1, explicit={"lr", "max_steps"}, allow_changed_optimizer=True)
    assert changes == {"lr": [1e-3, 5e-4], "max_steps": [20, 40]} and tc.lr == 5e-4
    # the global batch counts, not its split: 2 processes x 4 sequences = 1 process x 8
    d2, saved2 = _checkpoint(tmp_path / "two", world_size=2, batch_size=4)
    wider = dataclasses.replace(saved2, batch_size=8, resume=True)
    assert resumed_config(d2, wider, 1, explicit={"batch_size"})[1] == {}
    with pytest.raises(UserError, match=r"sequences per step\) 8 -> 4"):
        resumed_config(d2, dataclasses.replace(saved2, resume=True), 1, explicit=set())


def test_cli_resume_without_flags_continues_and_a_changed_lr_is_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("MOGELM_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "run")
    first = ["train", "--preset", "debug", "--data", DATA, "--seq-len", "32", "--batch-size", "2",
             "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2",
             "--threads", "1", "--progress", "none", "--out", out, "--stop-after", "2"]
    threads = torch.get_num_threads()
    try:
        assert cli.main(first) == 0
        assert cli.main(["train", "--out", out, "--resume"]) == 0  # no other flag: the saved settings
        recs = read_log(Path(out) / "log.jsonl")
        assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
        assert json.loads((Path(out) / "train_config.json").read_text())["batch_size"] == 2
        assert cli.main(["train", "--out", out, "--resume", "--max-steps", "6", "--lr", "1e-3",
                         "--allow-changed-optimizer", "--progress", "none"]) == 0
    finally:
        torch.set_num_threads(threads)
    recs = read_log(Path(out) / "log.jsonl")
    assert {"kind": "resume", "step": 4, "changed": {"lr": [2e-3, 1e-3], "max_steps": [4, 6]}} in recs
    assert max(r["step"] for r in recs) == 6


# What a user sees ----------------------------------------------------------------------------------
def test_progress_shows_is_at_the_models_group_count_and_eta_from_the_resumed_step(monkeypatch, capsys):
    clock = iter([100.0, 110.0])  # constructed at t=100, first update at t=110
    monkeypatch.setattr("mogelm.train.logs.time.time", lambda: next(clock))
    p = Progress(total=100, start=50, every=1, mode="lines", devices=4)
    p.update(50, {"loss": 2.0, "tok_s": 1000.0, "is8": [0.8, 0.9], "is4": [0.0, 0.0]})
    line = capsys.readouterr().err
    assert "step 51/100" in line and "IS@4 0.000" in line and "IS@8" not in line
    assert "ETA 8:10" in line  # 49 steps left at 1 step per 10 s; the 50 resumed steps are not counted
    clock = iter([0.0, 1.0])
    q = Progress(total=10, start=0, every=1, mode="lines", devices=16)  # not logged: the largest logged
    q.update(0, {"loss": 2.0, "tok_s": 1.0, "is8": [0.5], "is4": [0.25]})
    assert "IS@8 0.500" in capsys.readouterr().err


def test_plots_say_when_curves_are_smoothed_and_label_expert_ids(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mogelm.analysis import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    steps = list(range(1, 301))
    plots.imbalance_over_training({"topk": {"steps": steps, "is": {8: [[0.5, 0.6]] * 300}}}, [8],
                                  tmp_path / "a.png")
    plots.imbalance_over_training({"topk": {"steps": steps[:20], "is": {8: [[0.5, 0.6]] * 20}}}, [8],
                                  tmp_path / "b.png")
    assert "running means over 10 steps" in figs[0]._suptitle.get_text()
    assert "unsmoothed" in figs[1]._suptitle.get_text()
    E = 32
    plots.coactivation({"topk": [[[0.1] * E] * E]}, tmp_path / "c.png", 4, ["layer 0"])
    ax = figs[2].axes[0]
    assert list(ax.get_xticks()) == list(range(0, E, 4)) and ax.get_xlabel() == "expert"
    for f in figs:
        plots._plt().close(f)


def test_saved_weights_have_the_usual_permissions(tmp_path):
    save_pretrained(Transformer(from_name("debug")), tmp_path / "ckpt")
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (tmp_path / "ckpt").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_user_text_must_be_utf8_and_stray_bytes_are_reported(tmp_path):
    from mogelm.data import load_documents

    (tmp_path / "notes.txt").write_bytes("caf\u00e9 ".encode() * 200 + b"\xff\xfe tail\n")
    said = []
    docs = load_documents([str(tmp_path / "notes.txt")], warn=said.append)
    assert docs[0].text.endswith("\ufffd\ufffd tail\n") and said == [
        f"warning: {tmp_path / 'notes.txt'}: 2 byte(s) that are not UTF-8 were replaced by U+FFFD"]
    (tmp_path / "notes.txt").write_bytes(b"text\x00\x01\x02")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_documents([str(tmp_path / "notes.txt")], warn=said.append)


def test_one_process_distributed_checkpoint_warns_nothing(tmp_path):
    from mogelm.parallel.checkpoint import load_distributed, save_distributed

    model = Transformer(from_name("debug"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_distributed(str(tmp_path / "dcp"), model, extra={"step": 3})
        assert load_distributed(str(tmp_path / "dcp"), Transformer(from_name("debug"))) == {"step": 3}


def test_failed_fresh_comparison_leaves_no_folder_to_block_the_retry(tmp_path, monkeypatch):
    import mogelm.compare as C

    def fail(configs, jobs):
        raise UserError("training the topk model failed (exit status 2); see above")

    monkeypatch.setattr(C, "train_twins", fail)
    cc = C.CompareConfig(name="quick", runs_dir=str(tmp_path / "runs"), preset="debug", data=[DATA],
                         max_steps=2, seq_len=32, cache_dir=str(tmp_path / "cache"), jobs=1)
    with pytest.raises(UserError, match="failed"):
        C.run_comparison(cc)
    assert not cc.run_dir.exists()  # the retry is not told "already exists; pass --resume"


def test_explicit_options_are_the_flags_on_the_command_line():
    parser, _ = cli.build_parser(["train"])
    args = parser.parse_args(["train", "--lr", "1e-3", "--resume", "--data", "a", "b"])
    assert cli.explicit_options(args._parser, ["--lr", "1e-3", "--resume", "--data", "a", "b"]) == \
        {"lr", "resume", "data"}
    assert args.lr == 1e-3 and args.batch_size == 8  # the defaults themselves are untouched
    parser, _ = cli.build_parser(["sim"])
    args = parser.parse_args(["sim", "search", "--quick"])
    assert cli.explicit_options(args._parser, ["search", "--quick"]) == {"quick"}


def test_sim_search_plot_without_suffix_reports_the_file_it_writes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["sim", "search", "--quick", "--plot", str(tmp_path / "fig")]) == 0
    assert f"plot written to {tmp_path / 'fig.png'}" in capsys.readouterr().out
    assert (tmp_path / "fig.png").is_file() and not (tmp_path / "fig").exists()


def test_info_checks_weight_sizes_but_describes_a_config_alone(tmp_path, capsys):
    from mogelm.checkpoint import check_weight_files

    ckpt = tmp_path / "tiny-moge"
    save_pretrained(Transformer(from_name("debug")), ckpt)
    assert check_weight_files(ckpt) == len(__import__("safetensors").safe_open(
        str(ckpt / "model.safetensors"), "pt").keys())
    assert cli.main(["info", str(ckpt)]) == 0
    from mogelm.config import count_parameters

    total, active = count_parameters(from_name("debug"))  # 214,736 and 165,584
    assert capsys.readouterr().out.startswith(
        f"tiny-moge: {total / 1e3:.1f} K parameters, {active / 1e3:.1f} K active per token")
    (ckpt / "model.safetensors").unlink()  # e.g. a published config.json without its 140 GB of weights
    assert cli.main(["info", str(ckpt)]) == 0
