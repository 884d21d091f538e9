"""`mogelm bench decode` / `bench prefill` (mogelm.inference.bench_model) at toy size on the CPU: the
random-weight model in the preset's exact layout, the decode rows (step, TPOT, floor, breakdown,
largest batch, batches that do not fit), prefill through the engine, the transformers baseline, the
synthetic tokenizer of `serve --random-weights`, and the commands' one-line errors.

GPU (marked `gpu`): TRITON_INTERPRET=0 pytest -m gpu tests/test_bench_model.py (2 layers at the
72B widths, fp8-all, one graphed decode row with its breakdown; the tile sweeps run in
benchmarks/run_72b_h200.sh).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import mogelm
from mogelm.cli import main
from mogelm.inference import bench_model as bm
from mogelm.inference.fuse import FusedQKV
from mogelm.moe.experts import Fp8RoutedExperts
from mogelm.quant import Fp8Linear, Fp8Options, quantize_model


def test_random_model_has_the_exact_layout_and_fp8_skeleton():
    model = bm.build_random_model("debug", recipe="fp8-all", device="cpu", dtype=torch.float32, fuse=False)
    with torch.device("meta"):
        ref = mogelm.Transformer(mogelm.from_name("debug"))
    quantize_model(ref, Fp8Options.parse("fp8-all"))
    got = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    want = {k: (tuple(v.shape), v.dtype if v.dtype == torch.float8_e4m3fn or "scale" in k else torch.float32)
            for k, v in ref.state_dict().items()}
    assert got == want
    assert isinstance(model.layers[0].mlp.experts, Fp8RoutedExperts)
    assert model.layers[0].mlp.experts.activations == "auto"
    w = model.layers[1].self_attn.o_proj
    assert isinstance(w, Fp8Linear) and float(w.weight.float().abs().max()) > 0  # drawn, not empty
    assert torch.all(model.layers[0].input_layernorm.weight == 1)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
    again = bm.build_random_model("debug", recipe="fp8-all", device="cpu", dtype=torch.float32, fuse=False)
    assert torch.equal(again(torch.tensor([[1, 2, 3]])), logits)  # the seed fixes every draw


def test_requantize_adds_the_dense_projections_of_a_recipe():
    model = bm.build_random_model("debug", recipe="fp8-experts", device="cpu", dtype=torch.float32)
    qkv = model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, FusedQKV) and type(qkv.proj) is torch.nn.Linear
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids)
    bm.requantize(model, "fp8-all")
    assert isinstance(model.layers[0].self_attn.qkv_proj.proj, Fp8Linear)
    assert isinstance(model.layers[0].mlp.shared_expert.gate_up, Fp8Linear)
    after = model(ids)
    assert ((after - before).norm() / before.norm()) < 0.2  # e4m3 rounding of the dense weights only
    with pytest.raises(ValueError):
        bm.requantize(model, "bf16")


def test_decode_rows_on_cpu(capsys):
    s = bm.DecodeSettings(preset="debug", layers=2, recipes=("fp8-all",), kv_dtypes=("fp8", "bf16"),
                          batches=(1, 3, 100), context=40, hf=False, device="cpu", pool_tokens=6 * 48)
    res = bm.run_decode(s)
    rows = res["decode"]
    ok = [r for r in rows if "error" not in r]
    assert {(r["kv_dtype"], r["batch"]) for r in ok} == {("fp8", 1), ("fp8", 3), ("fp8", 6), ("bf16", 1),
                                                        ("bf16", 3), ("bf16", 6)}
    assert [r["batch"] for r in rows if "error" in r] == [100, 100]  # reported, not dropped
    for r in ok:
        assert r["logits_finite"] and r["step_ms"] > 0 and r["tpot_ms"] > 0
        assert 0 < r["floor_ms"] and r["tokens_per_s"] == pytest.approx(r["batch"] / r["tpot_ms"] * 1e3)
        assert set(r["breakdown_ms"]) >= {"attention", "attention_core", "routed_experts", "shared_expert",
                                          "other"}
        assert 1 <= r["experts_touched"] <= 8
    assert [r["largest"] for r in ok if r["batch"] == 6] == [True, True]
    kv = {r["kv_dtype"]: r["layer_kv_bytes"] for r in ok if r["batch"] == 3}
    assert kv["bf16"] == 2 * kv["fp8"] == 3 * 40 * 2 * 2 * 16 * 2  # rows x ctx x (K, V) x Hkv x hd x bytes
    assert "fp8-all" in bm.summary_table(res)


def test_prefill_and_hf_baseline_on_cpu():
    res = bm.run_prefill(bm.PrefillSettings(preset="debug", layers=2, long_prompt=48, num_prompts=3,
                                            prompt_len=16, chunk_size=32, repeats=1, device="cpu"))
    cases = {r["case"]: r for r in res["runs"]}
    assert cases["one_long"]["tokens"] == 48 and cases["one_long"]["steps"] == 1
    assert cases["many"]["tokens"] == 48 and cases["many"]["steps"] == 2  # 48 prompt tokens in chunks of 32
    pytest.importorskip("transformers")
    hf = bm.hf_baseline(mogelm.from_name("debug"), (1, 2), (1, 2), 32, torch.device("cpu"), steps=2)
    assert [r["batch"] for r in hf["rows"]] == [1, 2]
    assert all(r["step_ms_extrapolated"] > 0 for r in hf["rows"])


def test_random_tokenizer_covers_every_id():
    tok = bm.random_tokenizer(300)
    assert tok.vocab_size == 300
    assert tok.decode([0, 17, 299]) == "t0 t17 t299"
    assert tok.encode("t5 t6") == [5, 6]


def test_bench_decode_command_writes_json_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", "decode", "--device", "cpu", "--preset", "debug", "--layers", "1", "--batches", "2",
            "--context", "24", "--sections", "decode", "--kv-dtypes", "bf16", "--no-breakdown",
            "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "bench_decode.json").read_text())
    assert res["kind"] == "decode" and res["decode"][0]["batch"] == 2
    assert "step ms" in capsys.readouterr().out
    for bad, message in ((["--batches", "0,2"], "--batches takes positive"),
                         (["--recipes", "int4"], "unknown recipe"),
                         (["--sections", "decode,nope"], "--sections"),
                         (["--kv-dtypes", "int8"], "--kv-dtypes"),
                         (["--tuning", str(tmp_path / "none.json")], "--tuning")):
        assert main(argv[:-2] + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        assert main(["bench", "prefill", "--preset", "debug"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_served_random_weights_with_token_id_prompts():
    """What benchmarks/run_serve_h200.sh does, in process at toy size: the random-weight model and
    its synthetic tokenizer behind the real server, loaded with token-id prompts."""
    import asyncio

    pytest.importorskip("fastapi")
    from test_server import serving_in_thread

    from mogelm.inference import Engine
    from mogelm.inference.loadgen import load_test
    from mogelm.inference.server import create_app

    model = bm.build_random_model("debug", recipe="fp8-all", device="cpu", dtype=torch.float32,
                                  max_seq_len=128)
    engine = Engine(model, bm.random_tokenizer(model.cfg.vocab_size), max_batch=4, chunk_size=64)
    with serving_in_thread(create_app(engine, "random-debug")) as url:
        res = asyncio.run(load_test(url, concurrency=4, num_requests=6, max_tokens=5, prompt_tokens=20,
                                    prompt_vocab=model.cfg.vocab_size))
    assert (res["completed"], res["errors"], res["output_tokens"]) == (6, 0, 30)
    assert res["mean_prompt_tokens"] == 20 and res["prompt_tokens"] == 20
    assert res["tpot_ms"]["p50"] > 0 and res["ttft_ms"]["p99"] > 0


def test_weights_that_cannot_fit_are_refused_before_any_draw(capsys, monkeypatch):
    monkeypatch.setattr(bm, "device_bytes", lambda device: 25e9)  # a 25 GB machine, whatever this one has
    assert bm.random_weight_bytes("pangu-pro-moe-72b", "bf16") == pytest.approx(144e9, rel=0.01)
    assert bm.random_weight_bytes("pangu-pro-moe-72b", "fp8-all") == pytest.approx(73.6e9, rel=0.01)
    assert main(["bench", "decode", "--device", "cpu", "--recipes", "bf16"]) == 2
    assert "needs about 144 GB" in capsys.readouterr().err
    assert main(["serve", "--random-weights", "pangu-pro-moe-72b", "--device", "cpu"]) == 2
    assert "needs about" in capsys.readouterr().err


def test_serve_random_weights_flag_errors(capsys):
    assert main(["serve", "--random-weights", "nope"]) == 2
    assert "is not a preset" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err
    assert main(["serve", "--model", "x", "--random-weights", "debug"]) == 2
    assert "not both" in capsys.readouterr().err


# --- GPU ----------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                         reason="needs a CUDA GPU with TRITON_INTERPRET unset")


@pytest.mark.gpu
@gpu
def test_gpu_one_decode_row_at_72b_widths():
    model = bm.build_random_model("pangu-pro-moe-72b", layers=2, recipe="fp8-all", device="cuda",
                                  max_seq_len=1024)
    dev = torch.device("cuda")
    cache = bm.make_pool(model, "fp8", 16, dev, reserve_gib=0, max_tokens=8 * 1024)
    wb = bm.weight_bytes(model)
    row = bm.measure_decode(model, cache, 8, 512, 4000.0, wb, dev)
    assert row["logits_finite"] and row["capture_s"] > 0
    assert 0 < row["step_ms"] <= row["tpot_ms"]
    assert 0.05 < row["frac_floor"] < 1.3  # against a nominal 4 TB/s
    b = row["breakdown_ms"]
    assert b["attention"] > b["attention_core"] > 0 and b["routed_experts"] > 0 and b["shared_expert"] > 0
