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

FP8 checkpoints (`mogelm quantize`, quantize_checkpoint; layout in docs/quantization.md): the
target modules' `.weight` is e4m3 and a `.weight_scale` [out, 1] fp32 sits beside it, with a
compressed-tensors `quantization_config` in config.json. from_pretrained recognises them by
their tensors and builds Fp8RoutedExperts / Fp8Linear modules (mogelm.quant) with fp8 storage;
`from_pretrained(..., quantize="fp8")` quantises a bf16 checkpoint tensor by tensor while loading.

Loading builds the model on the meta device and assigns tensors read one at a time from the
memory-mapped safetensors files straight to the target device (quantised there when asked), so a
model never needs twice its size in RAM, and an fp8 load never holds the bf16 model. Missing,
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
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mogelm.errors import UserError
from mogelm.fsutil import usual_permissions
from mogelm.hf_config import (  # noqa: F401 (re-exported)
    CONFIG_NAME,
    config_from_hf,
    config_to_hf,
    fp8_quantization_config,
    read_config,
    read_quantization_config,
)
from mogelm.kernels import ops
from mogelm.model import Transformer, rope_inv_freq
from mogelm.moe.experts import Fp8RoutedExperts
from mogelm.quant import Fp8Linear, Fp8Options, fp8_module_names, is_target, quantize_model, target_patterns

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.mlp\.experts\."
                        r"(gate_up_EFD|down_EDF|gate_up_scale_EF|down_scale_ED)$")
_SCALE = ".weight_scale"  # beside an e4m3 ".weight": fp32 [out, 1] (compressed-tensors, per channel)
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
            if name.endswith(_SCALE):  # Fp8Linear keeps [out]; the checkpoint convention is [out, 1]
                t = t.reshape(-1, 1)
            out[_to_checkpoint_name(name)] = t.contiguous()
            continue
        layer, kind = m.groups()
        prefix = f"model.layers.{layer}.mlp.experts"
        suffix = "weight_scale" if "scale" in kind else "weight"
        if "scale" in kind:
            t = t.unsqueeze(-1)
        F = cfg.moe_intermediate_size
        for e in range(t.shape[0]):
            if kind.startswith("gate_up"):
                out[f"{prefix}.{e}.gate_proj.{suffix}"] = t[e, :F].contiguous()
                out[f"{prefix}.{e}.up_proj.{suffix}"] = t[e, F:].contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.{suffix}"] = t[e].contiguous()
    return out


def _fp8_targets_of(model: Transformer) -> tuple[str, ...] | None:
    """compressed-tensors targets of a quantised model (None when it holds no fp8 module)."""
    fp8 = [n for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8RoutedExperts))]
    if not fp8:
        return None
    return target_patterns(attention=any(".self_attn." in n for n in fp8))


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
            usual_permissions(staging / fname)  # safetensors writes 0600
            files.append(fname)
            weight_map.update(dict.fromkeys(shard, fname))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (staging / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
            files.append(INDEX_FILE)
        hf = config_to_hf(model.cfg, dtype)
        targets = _fp8_targets_of(model)
        if targets is not None:
            hf["quantization_config"] = fp8_quantization_config(targets)
        (staging / CONFIG_NAME).write_text(json.dumps(hf, indent=2))
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


# checking without loading ---------------------------------------------------------------------------
def check_weight_files(path: str | os.PathLike, missing_ok: bool = False) -> int:
    """Check that every safetensors file of checkpoint directory `path` holds all the bytes its
    header promises (a copy cut short shows up here, before anything loads it); reads only the
    headers. Returns the number of tensors (0 for a folder without weights when missing_ok);
    UserError naming the file and the shortfall."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is corrupt ({type(e).__name__}); re-save the checkpoint") from None
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    elif missing_ok:
        return 0
    else:
        raise UserError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}: the checkpoint has no weights")
    count = 0
    for name in files:
        count += _check_safetensors_size(path / name)
    return count


def _check_safetensors_size(file: Path) -> int:
    """The safetensors layout: 8-byte little-endian header length N, N bytes of JSON header
    ({name: {dtype, shape, data_offsets: [begin, end]}}), then the data, offsets counted from its start."""
    corrupt = f"{file} is not a complete safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise UserError(f"{corrupt}: {size} bytes, too short for its header; the checkpoint is "
                                "corrupt (copy it again)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{corrupt}: its header is not JSON; the checkpoint is corrupt") from None
    if not isinstance(header, dict):
        raise UserError(f"{corrupt}: its header is not a JSON object; the checkpoint is corrupt")
    need = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            need = max(need, 8 + n + int(meta["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise UserError(f"{corrupt}: tensor {name!r} has no data_offsets; the checkpoint is corrupt") \
                from None
    if size < need:
        raise UserError(f"{file} is truncated: its header needs {need:,} bytes, the file has {size:,}; "
                        "the checkpoint is corrupt (copy it again)")
    return sum(1 for k in header if k != "__metadata__")


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


def _stored_fp8_modules(weight_map: dict[str, str]) -> set[str]:
    """Model module names whose checkpoint weights are e4m3 (a `.weight_scale` beside them)."""
    names = set()
    for ck in weight_map:
        if not ck.endswith(_SCALE):
            continue
        module = ck.removesuffix(_SCALE).removeprefix("model.")
        m = re.match(r"^(layers\.\d+\.mlp\.experts)\.\d+\.(gate|up|down)_proj$", module)
        names.add(m.group(1) if m else module)
    return names


def from_pretrained(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    quantize: str | Fp8Options | None = None,
) -> Transformer:
    """Load a checkpoint directory (ours or a published PanguProMoE one) into a Transformer.

    dtype: of every tensor that is not fp8 (default: as stored). An fp8 checkpoint loads with its
    e4m3 weights and fp32 scales as stored. quantize="fp8" (or "fp8-attention", or an
    Fp8Options) quantises a bf16 checkpoint's experts (and attention) on `device`, one checkpoint
    tensor at a time; on an fp8 checkpoint it sets the fp8 modules' activation modes."""
    path = Path(path)
    cfg = read_config(path)
    qcfg = read_quantization_config(path)
    try:
        options = Fp8Options.parse(quantize)
    except ValueError as e:
        raise UserError(str(e)) from None
    weight_map = _checkpoint_files(path)
    stored_fp8 = _stored_fp8_modules(weight_map)
    if bool(stored_fp8) != (qcfg is not None):
        what = ("has weight_scale tensors but config.json no quantization_config" if stored_fp8 else
                "config.json has a quantization_config but no weight_scale tensors")
        raise UserError(f"checkpoint {path} {what}; re-create it with `mogelm quantize`")
    with torch.device("meta"):
        model = Transformer(cfg)
    targets = set(stored_fp8)
    if options is not None:
        if not cfg.is_moe:
            raise UserError(f"{path}: fp8 quantisation covers the routed and shared experts; "
                            "this model is dense")
        targets |= set(fp8_module_names(model, options.attention, options.shared))
    if targets:
        try:
            quantize_model(model, options or Fp8Options(), names=sorted(targets))  # meta: the fp8 skeleton
        except (ValueError, AttributeError) as e:
            raise UserError(f"checkpoint {path} does not match its config: {e}") from None
    expected = {n: t for n, t in model.state_dict().items()
                if not (cfg.tie_embeddings and n == "lm_head.weight")}

    handles = {}
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    used: set[str] = set()
    try:
        for fname in sorted(set(weight_map.values())):
            handles[fname] = _open(path / fname)

        remaining = Counter(weight_map.values())  # tensors still to read, per file

        def read(name: str) -> torch.Tensor | None:
            if name not in weight_map:
                problems.append(f"missing {name}")
                return None
            used.add(name)
            fname = weight_map[name]
            t = handles[fname].get_tensor(name)
            remaining[fname] -= 1
            if remaining[fname] == 0:  # unmap a finished shard: its pages leave this process's RSS
                del handles[fname]
            return t

        def read_weight(ck: str, shape: list[int], fp8: bool) -> tuple[Tensor, Tensor | None] | None:
            """(tensor on device, fp32 scale [out] or None); quantised here when fp8 is wanted but
            the checkpoint holds a float weight. None after recording a problem."""
            t = read(ck)
            if t is None:
                return None
            if list(t.shape) != shape:
                problems.append(f"{ck} has shape {list(t.shape)}, expected {shape}")
                return None
            stored = ck.removesuffix(".weight") + _SCALE in weight_map
            if t.dtype == torch.float8_e4m3fn and not stored:
                problems.append(f"{ck} is e4m3 but has no {_SCALE.lstrip('.')}")
                return None
            if not fp8:
                return t.to(device=device, dtype=dtype or t.dtype), None
            if not stored:
                return ops.quantize_rows_fp8(t.to(device))
            scale = read(ck.removesuffix(".weight") + _SCALE)
            if scale is None:
                return None
            if t.dtype != torch.float8_e4m3fn or scale.numel() != shape[0]:
                problems.append(f"{ck}: expected e4m3 with {shape[0]} scales, "
                                f"got {t.dtype} with {scale.numel()}")
                return None
            return t.to(device), scale.to(device=device, dtype=torch.float32).reshape(-1)

        F = cfg.moe_intermediate_size
        for name, meta in expected.items():
            module_name = name.rpartition(".")[0]
            flat = _flat_name(name, cfg.num_layers)  # an MTP module's name as the layer it is stored as
            m = _EXPERT_RE.match(flat)
            if m is not None:
                layer, kind = m.groups()
                if "scale" in kind:
                    continue  # filled with its weights
                fp8 = isinstance(model.get_submodule(module_name), Fp8RoutedExperts)
                parts = ("gate_proj", "up_proj") if kind == "gate_up_EFD" else ("down_proj",)
                want = list(meta.shape[1:]) if kind == "down_EDF" else [F, meta.shape[2]]
                stacked = scales = None
                for e in range(cfg.num_experts):
                    for j, part in enumerate(parts):
                        got = read_weight(f"model.layers.{layer}.mlp.experts.{e}.{part}.weight", want, fp8)
                        if got is None:
                            continue
                        w, sc = got
                        if stacked is None:
                            stacked = torch.empty(meta.shape, dtype=w.dtype, device=device)
                            scales = (torch.empty(meta.shape[:2], dtype=torch.float32, device=device)
                                      if fp8 else None)
                        rows = slice(j * F, (j + 1) * F) if kind == "gate_up_EFD" else slice(None)
                        stacked[e, rows] = w
                        if fp8:
                            scales[e, rows] = sc
                if stacked is not None:
                    state[name] = stacked
                    if fp8:
                        scale_name = "gate_up_scale_EF" if kind == "gate_up_EFD" else "down_scale_ED"
                        state[f"{module_name}.{scale_name}"] = scales
                continue
            if name.endswith(_SCALE):
                continue  # filled with its weight
            if isinstance(model.get_submodule(module_name), Fp8Linear) and name.endswith(".weight"):
                got = read_weight(_to_checkpoint_name(flat), list(meta.shape), fp8=True)
                if got is not None:
                    state[name], state[module_name + _SCALE] = got
                continue
            ck = _to_checkpoint_name(flat)
            if ck not in weight_map and name.endswith("expert_bias_E"):  # published checkpoints have none
                state[name] = torch.zeros(meta.shape, device=device)
                continue
            got = read_weight(ck, list(meta.shape), fp8=False)
            if got is not None:
                state[name] = got[0]
        unexpected = sorted(n for n in weight_map if n not in used and not n.endswith("rotary_emb.inv_freq"))
        problems += [f"unexpected {n}" for n in unexpected]
        if problems:
            raise_mismatch(path, problems)
    finally:
        handles.clear()
    return assign_loaded(model, state, device)


def raise_mismatch(path, problems: list[str]) -> None:
    """The one error listing what a checkpoint lacks or holds wrongly (the first 20 problems)."""
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise UserError(f"checkpoint {path} does not match its config: " + "; ".join(shown))


def assign_loaded(model: Transformer, state: dict[str, Tensor], device) -> Transformer:
    """Put the tensors read from a checkpoint into a meta-device skeleton (no copies), tie the
    embeddings, compute the non-persistent buffers, and check nothing is left on the meta device."""
    cfg = model.cfg
    model.load_state_dict(state, strict=False, assign=True)
    for mod in model.modules():  # assign=True copies requires_grad from the meta skeleton's params
        if isinstance(mod, (Fp8Linear, Fp8RoutedExperts)):
            mod.requires_grad_(False)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers were built on the meta device: compute them for real.
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, device)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not still_meta, f"parameters left on the meta device: {still_meta}"
    return model


# quantised checkpoints ---------------------------------------------------------------------------
def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, attention: bool = False,
                        device: str | torch.device = "cpu", max_shard_size: int | str = "5GB") -> dict:
    """Write an fp8 copy of checkpoint `src` to the new directory `dst` (`mogelm quantize`).

    Streams: each target weight is read from the memory-mapped input, quantised on `device`
    (per output row, amax / 448) and written with its `weight_scale` [out, 1]; other tensors are
    copied as stored; shards are written as they fill (max_shard_size), so memory stays near one
    shard whatever the model's size. config.json gains the quantization_config block; the other
    files of `src` (tokenizer, generation config) are copied. `dst` appears only when complete.
    Returns {"tensors", "quantized", "bytes_in", "bytes_out", "files"}."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise UserError(f"output {dst} already exists; choose a new directory")
    if not dst.parent.is_dir():
        raise UserError(f"output folder {dst.parent} does not exist")
    cfg = read_config(src)
    if read_quantization_config(src) is not None:
        raise UserError(f"{src} is already quantised (config.json has a quantization_config)")
    if not cfg.is_moe:
        raise UserError(f"{src}: fp8 quantisation covers the routed and shared experts; this model is dense")
    weight_map = _checkpoint_files(src)
    with torch.device("meta"):
        expected = {n: list(t.shape) for n, t in to_checkpoint_tensors(Transformer(cfg)).items()}
    handles = {f: _open(src / f) for f in sorted(set(weight_map.values()))}
    problems = [f"missing {n}" for n in expected if n not in weight_map]
    problems += [f"{n} has shape {handles[weight_map[n]].get_slice(n).get_shape()}, expected {shape}"
                 for n, shape in expected.items()
                 if n in weight_map and handles[weight_map[n]].get_slice(n).get_shape() != shape]
    problems += [f"unexpected {n}" for n in weight_map if n not in expected and not n.endswith("inv_freq")]
    if problems:
        handles.clear()
        raise UserError(f"checkpoint {src} does not match its config: " + "; ".join(problems[:20]))

    patterns = target_patterns(attention)
    limit = _parse_size(max_shard_size)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    stats = {"tensors": 0, "quantized": 0, "bytes_in": 0, "bytes_out": 0}
    try:
        shards: list[str] = []
        weight_map_out: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}

        def flush() -> None:
            name = f"shard-{len(shards):05d}.safetensors"  # renamed below once the count is known
            save_file(shard, str(staging / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map_out.update(dict.fromkeys(shard, name))
            shard.clear()

        size = 0
        for name in expected:
            t = handles[weight_map[name]].get_tensor(name)
            stats["tensors"] += 1
            stats["bytes_in"] += t.numel() * t.element_size()
            if name.endswith(".weight") and is_target(name.removesuffix(".weight"), patterns):
                q, scale = ops.quantize_rows_fp8(t.to(device))
                out = {name: q.cpu(), name.removesuffix(".weight") + _SCALE: scale.reshape(-1, 1).cpu()}
                stats["quantized"] += 1
            else:
                out = {name: t}
            nbytes = sum(v.numel() * v.element_size() for v in out.values())
            if shard and size + nbytes > limit:
                flush()
                size = 0
            shard.update(out)
            size += nbytes
            stats["bytes_out"] += nbytes
        if shard:
            flush()
        handles.clear()
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for old, new in zip(shards, names):
            os.replace(staging / old, staging / new)
        if len(shards) > 1:
            renamed = dict(zip(shards, names))
            (staging / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": stats["bytes_out"]},
                 "weight_map": {k: renamed[v] for k, v in weight_map_out.items()}}, indent=2))
        hf = json.loads((src / CONFIG_NAME).read_text())
        hf["quantization_config"] = fp8_quantization_config(patterns)
        (staging / CONFIG_NAME).write_text(json.dumps(hf, indent=2))
        for f in src.iterdir():  # tokenizer, generation config, README: not weights, not optimizer state
            skip = f.name in (CONFIG_NAME, INDEX_FILE) or f.name.startswith("trainer_state")
            if f.is_file() and not skip and not f.name.endswith(".safetensors"):
                shutil.copy2(f, staging / f.name)
        os.replace(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stats["files"] = len(shards)
    return stats
