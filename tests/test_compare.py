"""mogelm compare (the main job) on the debug preset: report, plots, summary, and no overwrite."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from mogelm import cli

FIXTURES = Path(__file__).parent / "data"
PNGS = ("val_loss.png", "imbalance.png", "expert_load.png", "intra_group.png", "coactivation.png")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["compare", "--runs-dir", str(runs), "--name", "t", "--preset", "debug", "--data", str(FIXTURES),
            "--max-steps", "16", "--eval-every", "8", "--eval-batches", "2", "--seq-len", "64",
            "--batch-size", "4", "--cache-dir", str(runs / ".cache")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # run once for the module: both tests read its output
        status = cli.main(argv)
    return runs / "t", argv, status, stdout.getvalue()


def test_compare_writes_report_and_plots(compared):
    run_dir, argv, status, out = compared
    assert status == 0
    assert "moge" in out and "topk" in out and "val loss" in out
    for name in PNGS:
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    report = (run_dir / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in report
    summary = json.loads((run_dir / "summary.json").read_text())
    moge, topk = summary["models"]["moge"], summary["models"]["topk"]
    assert moge["steps"] == topk["steps"] == 16 and moge["tokens"] == topk["tokens"]
    assert f"{moge['final_val_loss']:.4f}" in out and f"{topk['final_val_loss']:.4f}" in out
    # debug: 8 experts in 4 groups. On 4 devices MoGE is balanced on every step; top-k is not.
    assert moge["devices"]["4"]["is_max"] == 0.0 and moge["devices"]["4"]["busiest_over_mean_max"] == 1.0
    assert topk["devices"]["4"]["is_mean"] > 0.0
    # Two experts of one MoGE group never fire for the same token.
    assert summary["max_within_group_coactivation"]["moge"] == 0.0
    assert summary["max_within_group_coactivation"]["topk"] > 0.0
    assert (run_dir / "moge" / "final" / "tokenizer.json").is_file()


def test_compare_refuses_to_overwrite(compared, capsys):
    run_dir, argv, status, _ = compared
    assert status == 0 and (run_dir / "report.md").exists()
    before = (run_dir / "report.md").read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and "Traceback" not in err
    assert (run_dir / "report.md").read_bytes() == before
    # --resume on a finished comparison trains nothing more and rewrites the same numbers.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert cli.main([*argv, "--resume"]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["models"]["moge"]["final_val_loss"] == summary["models"]["moge"]["final_val_loss"]
    assert again["models"]["topk"]["steps"] == 16


def test_model_overrides_reach_both_twin_runs(tmp_path, monkeypatch):
    """Both models get the comparison's model overrides, whether trained in this process (jobs 1)
    or each in its own worker process (jobs 2: the TrainConfig travels as JSON to the worker)."""
    import subprocess

    from mogelm import compare

    cc = compare.CompareConfig(runs_dir=str(tmp_path), preset="debug", baseline="softmax_topk", max_steps=3,
                               model_overrides={"aux_free_bias": True, "z_loss_coef": 1e-3})
    configs = compare.twin_configs(cc, threads=1)
    assert [tc.routing for tc in configs] == ["moge", "softmax_topk"]
    assert all(tc.model_overrides == cc.model_overrides for tc in configs)

    trained = []
    monkeypatch.setattr(compare, "train", lambda tc: trained.append(tc) or {})
    compare.train_twins(configs, jobs=1)
    assert trained == configs

    class FinishedProcess:  # what Popen returns, for a worker that has already exited
        returncode = 0

        def poll(self):
            return 0

    envs = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, env: envs.append(env) or FinishedProcess())
    compare.train_twins(configs, jobs=2)
    trained.clear()
    monkeypatch.setattr(compare, "train", lambda tc: trained.append(tc) or {"final_val": {"val_loss": 1.0},
                                                                           "final_dir": "final"})
    for env in envs:  # each worker's entry point, with the environment its process was given
        monkeypatch.setattr(compare.os, "environ", env)
        assert compare._train_worker() == 0
    assert trained == configs
