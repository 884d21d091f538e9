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
            "--max-steps", "16", "--eval-every", "8", "--eval-batches", "2", "--seq-len", "64", "--batch-size", "4",
            "--cache-dir", str(runs / ".cache")]
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
