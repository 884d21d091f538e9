"""HF-format checkpoint directories in the published Pangu Pro MoE layout (PAPER.md §3.3).

    mogelm.save_pretrained(model, "out/")                # config.json + model.safetensors
    mogelm.save_pretrained(model, "out/", max_shard_size="2GB")   # + model.safetensors.index.json
    model = mogelm.from_pretrained("out/")               # also reads a PanguProMoE directory

Tensor names: `model.embed_tokens.weight`, `model.layers.{l}.self_attn.{q,k,v,o}_proj.{weight,bias}`,
`model.layers.{l}.mlp.gate.weight`, `mlp.router_scale` [1, E], `mlp.experts.{e}.{gate,up,down}_proj.weight`,
`mlp.shared_expert.*`, `model.norm.weight`, `lm_head.weight`. In memory the routed experts are
stacked (gate_up_EFD [E, 2F, D], down_EDF [E, D, F]); this module splits and re-stacks them.

MTP modules (mogelm.mtp; config.json `num_nextn_predict_layers` > 0) are stored the way DeepSeek-V3
stores its MTP layer: module i (0-based, `mtp.{i}` in memory) as layer L + i after the L trunk
layers, `model.layers.{L+i}.{enorm,hnorm,eh_proj,shared_head.norm}.weight` plus its block's
`input_layernorm`, `self_attn.*`, `post_attention_layernorm`, `mlp.*` under the same prefix
(experts split as above). The shared embedding and LM head are not written again. A checkpoint
without MTP has none of these names and is written exactly as before.

config.json carries the HF fields (`model_type: "PanguProMoE"` when the model is a Pangu-style
MoGE, which has no group field: groups = num_experts_per_tok) and, for our own models, the full
mogelm config under the key "mogelm".

Loading builds the model on the meta device and assigns tensors read one at a time from the
memory-mapped safetensors files, so a model never needs twice its size in RAM. Missing,
unexpected or mis-shaped tensors are reported together in one UserError. Saving writes into a
temporary folder and moves finished files into place, so an interrupted save never leaves a
half-written checkpoint behind the old one's index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mogelm.errors import UserError
from mogelm.hf_config import CONFIG_NAME, config_from_hf, config_to_hf, read_config  # noqa: F401 (re-exported)
from mogelm.model import Transformer, rope_inv_freq

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_EFD|down_EDF)$")
_CKPT_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\."
                             r"(gate_proj|up_proj|down_proj)\.weight$")


# name mapping -----------------------------------------------------------------------------------
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(?:block\.)?(.*)$")


def _flat_name(name: str, num_layers: int) -> str:
    """An MTP module's state_dict name as the trunk layer it is stored as (DeepSeek-V3 layout):
    mtp.{i}.block.X -> layers.{L+i}.X, mtp.{i}.norm.weight -> layers.{L+i}.shared_head.norm.weight,
    mtp.{i}.{enorm,hnorm,eh_proj}.weight -> layers.{L+i}.*; other names unchanged."""
    m = _MTP_RE.match(name)
    if m is None:
        return name
    i, rest = int(m.group(1)), m.group(2)
    if rest == "norm.weight":
        rest = "shared_head.norm.weight"
    return f"layers.{num_layers + i}.{rest}"


def _to_checkpoint_name(name: str) -> str:
    return (name if name.startswith("lm_head.")
            else "model." + name.replace(".mlp.expert_bias_E", ".mlp.expert_bias"))


def to_checkpoint_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict in checkpoint naming, with the stacked experts split per expert."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # safetensors refuses shared storage; the tie is restored on load
        name = _flat_name(name, cfg.num_layers)
        m = _EXPERT_RE.match(name)
        if m is None:
            out[_to_checkpoint_name(name)] = t.contiguous()
            continue
        layer, kind = m.groups()
        prefix = f"model.layers.{layer}.mlp.experts"
        F = cfg.moe_intermediate_size
        for e in range(t.shape[0]):
            if kind == "gate_up_EFD":
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :F].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, F:].contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
    return out


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise UserError(f"max_shard_size {size!r} is not a size like '2GB' or '500MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


def save_pretrained(model: Transformer, path: str | os.PathLike,
                    max_shard_size: int | str | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index when over max_shard_size)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_checkpoint_tensors(model)
    dtype = next(iter(tensors.values())).dtype
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
    try:
        files: list[str] = []
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(staging / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
            files.append(INDEX_FILE)
        (staging / CONFIG_NAME).write_text(json.dumps(config_to_hf(model.cfg, dtype), indent=2))
        files.append(CONFIG_NAME)
        # Remove weights of an earlier save that this one does not overwrite, then move in place.
        for old in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
            if old.name not in files and old.exists():
                old.unlink()
        for fname in files:
            os.replace(staging / fname, path / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# loading ----------------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> dict[str, str]:
    """checkpoint tensor name -> file name."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is corrupt ({e}); re-save the checkpoint") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise UserError(f"{path}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return weight_map
    single = path / SINGLE_FILE
    if not single.is_file():
        raise UserError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise UserError(f"{file} is not a readable safetensors file ({e}); "
                        "the checkpoint is corrupt") from None


def from_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load a checkpoint directory (ours or a published PanguProMoE one) into a Transformer."""
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: t for n, t in model.state_dict().items()
                if not (cfg.tie_embeddings and n == "lm_head.weight")}
    weight_map = _checkpoint_files(path)

    handles = {}
    try:
        for fname in sorted(set(weight_map.values())):
            handles[fname] = _open(path / fname)

        def read(name: str) -> torch.Tensor:
            return handles[weight_map[name]].get_tensor(name)

        state: dict[str, torch.Tensor] = {}
        problems: list[str] = []
        used: set[str] = set()
        F = cfg.moe_intermediate_size
        for name, meta in expected.items():
            target_dtype = dtype or None
            flat = _flat_name(name, cfg.num_layers)
            m = _EXPERT_RE.match(flat)
            if m is None:
                ck = _to_checkpoint_name(flat)
                if ck not in weight_map:
                    if name.endswith("expert_bias_E"):  # optional: published checkpoints have none
                        state[name] = torch.zeros(meta.shape)
                        continue
                    problems.append(f"missing {ck}")
                    continue
                t = read(ck)
                used.add(ck)
                if tuple(t.shape) != tuple(meta.shape):
                    problems.append(f"{ck} has shape {list(t.shape)}, expected {list(meta.shape)}")
                    continue
                state[name] = t.to(device=device, dtype=target_dtype or t.dtype)
                continue
            layer, kind = m.groups()
            parts = ("gate_proj", "up_proj") if kind == "gate_up_EFD" else ("down_proj",)
            stacked = None
            for e in range(cfg.num_experts):
                for j, part in enumerate(parts):
                    ck = f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"
                    if ck not in weight_map:
                        problems.append(f"missing {ck}")
                        continue
                    t = read(ck)
                    used.add(ck)
                    want = list(meta.shape[1:]) if kind == "down_EDF" else [F, meta.shape[2]]
                    if list(t.shape) != want:
                        problems.append(f"{ck} has shape {list(t.shape)}, expected {want}")
                        continue
                    if stacked is None:
                        stacked = torch.empty(meta.shape, dtype=target_dtype or t.dtype, device=device)
                    rows = slice(j * F, (j + 1) * F) if kind == "gate_up_EFD" else slice(None)
                    stacked[e, rows] = t
            if stacked is not None:
                state[name] = stacked
        unexpected = sorted(n for n in weight_map if n not in used and not n.endswith("rotary_emb.inv_freq"))
        problems += [f"unexpected {n}" for n in unexpected]
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise UserError(f"checkpoint {path} does not match its config: " + "; ".join(shown))
    finally:
        handles.clear()

    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers were built on the meta device: compute them for real.
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, device)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not still_meta, f"parameters left on the meta device: {still_meta}"
    return model
