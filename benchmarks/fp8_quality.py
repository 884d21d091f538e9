"""Quality of fp8 weights on a trained checkpoint (CPU is fine): validation perplexity and greedy text
of the stored model against its fp8 variants, all in one run on the same tokens.

    mogelm train --preset debug --max-steps 400 --out /tmp/q            # a trained model
    python benchmarks/fp8_quality.py --model /tmp/q/final --out /tmp/q-quality

Variants: experts fp8 weight-only (the default of `mogelm quantize`), experts W8A8, experts +
attention fp8. Perplexity: mean next-token loss over non-overlapping windows of the held-out part
of the embedded corpus (as `mogelm eval`), same windows for every variant. Greedy text: the first
`--prompt-tokens` tokens of `--prompts` held-out windows, `--new-tokens` tokens each through the
inference engine (temperature 0, no EOS stop); "identical" = every generated token equal to the
unquantised model's. Writes quality.json to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mogelm import data as D
from mogelm.checkpoint import from_pretrained
from mogelm.evaluate import evaluate_batches
from mogelm.inference import Engine, SamplingParams
from mogelm.quant import Fp8Options

VARIANTS = {
    "stored": None,
    "fp8 experts (weight-only)": Fp8Options(),
    "fp8 experts (W8A8)": Fp8Options(expert_activations="fp8"),
    "fp8 experts + attention": Fp8Options(attention=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory (trained, unquantised)")
    p.add_argument("--out", required=True, help="folder for quality.json")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=40, help="0 = all held-out windows")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)

    tok = D.load_tokenizer(args.model)
    _, docs = D.split_documents(D.default_documents(), 0.05)
    eos = tok.token_to_id(D.EOS_TOKEN)
    ids = torch.from_numpy(D.encode_documents(tok, docs, eos if eos is not None else 0))
    T = args.seq_len
    windows = torch.stack([ids[k * T: k * T + T + 1] for k in range((len(ids) - 1) // T)])
    if args.max_batches:
        windows = windows[: args.max_batches * args.batch_size]
    batches = [(w[:, :-1], w[:, 1:]) for w in windows.split(args.batch_size)]
    step = max(1, len(windows) // args.prompts)
    prompts = [windows[i * step, : args.prompt_tokens].tolist() for i in range(args.prompts)]

    results, reference = {}, None
    for name, options in VARIANTS.items():
        start = time.perf_counter()
        model = from_pretrained(args.model, quantize=options).eval()
        ev = evaluate_batches(model, batches)
        engine = Engine(model, None, max_batch=16, cuda_graphs=False)
        outs = engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0.0,
                                                        ignore_eos=True))
        texts = [o.token_ids for o in outs]
        reference = reference or texts
        same = sum(a == b for a, b in zip(texts, reference))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                      for a, b in zip(texts, reference)]
        results[name] = {"loss": ev["loss"], "ppl": ev["ppl"], "tokens": ev["tokens"],
                         "greedy_identical": same, "prompts": len(prompts),
                         "mean_tokens_before_first_difference": sum(first_diff) / len(first_diff),
                         "seconds": time.perf_counter() - start}
        print(f"{name:28s} loss {ev['loss']:.5f} ppl {ev['ppl']:.4f} greedy identical {same}/{len(prompts)}",
              flush=True)
    base = results["stored"]["ppl"]
    for r in results.values():
        r["ppl_change_percent"] = 100 * (r["ppl"] / base - 1)
    meta = {"model": str(Path(args.model).resolve()), "date": time.strftime("%Y-%m-%d"),
            "windows": len(windows), "seq_len": T, "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\n{'variant':28s} {'ppl':>9} {'vs stored':>9} {'greedy same':>11}")
    for name, r in results.items():
        print(f"{name:28s} {r['ppl']:9.4f} {r['ppl_change_percent']:+8.3f}% "
              f"{r['greedy_identical']:>5}/{r['prompts']}")
    assert all(math.isfinite(r["loss"]) for r in results.values())


if __name__ == "__main__":
    main()
