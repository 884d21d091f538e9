"""A model's shapes and parameter counts (mogelm/info.py) and the `mogelm info` command."""

import json

import pytest

from mogelm import save_pretrained
from mogelm.cli import main
from mogelm.config import count_parameters, from_name
from mogelm.errors import UserError
from mogelm.info import describe, load_config, model_info
from mogelm.model import Transformer


def test_pangu_counts_and_shapes():
    cfg = load_config("pangu-pro-moe-72b")
    assert model_info(cfg)["parameters_total"] == 71_988_781_056  # PAPER.md: 71.99 B total, 16.50 B active
    assert model_info(cfg)["parameters_active"] == 16_498_139_136
    assert describe(cfg).splitlines() == [
        "pangu-pro-moe-72b: 71.989 B parameters, 16.498 B active per token",
        "  48 layers, hidden 5120, 40/8 heads of 128",
        "  64 experts of width 1344 in 8 groups, 8 per token (moge), shared expert 5376",
    ]


def test_checkpoint_directory_and_json(tmp_path, capsys):
    cfg = from_name("debug")
    save_pretrained(Transformer(cfg), tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"] == load_config(str(tmp_path / "ckpt")).to_dict()
    assert (out["parameters_total"], out["parameters_active"]) == count_parameters(cfg)


def test_unknown_model_is_a_user_error(capsys):
    with pytest.raises(UserError, match="neither a preset"):
        load_config("no-such-preset")
    assert main(["info", "no-such-preset"]) == 2
    assert capsys.readouterr().err.startswith("error: 'no-such-preset' is neither a preset")
