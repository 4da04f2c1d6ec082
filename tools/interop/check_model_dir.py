#!/usr/bin/env python3
"""Checks a whole `forge quantize` output directory against the real libraries (issue 13).

Usage: check_model_dir.py OUT_DIR MODEL_DIR
       check_model_dir.py --load-only OUT_DIR
  OUT_DIR    what `forge quantize MODEL_DIR -o OUT_DIR` wrote (compressed-tensors, symmetric)
  MODEL_DIR  the model it was made from (BF16/F16/F32 weights)
  --load-only  for models whose weights transformers reshapes at load (MoE experts fused
             into 3-D tensors) or that came from FP8: (a), then both load paths with no
             missing/unexpected/mismatched keys and the same finite logits.

Checks:
(a) the quantization_config validates as compressed-tensors' `QuantizationConfig` (pydantic,
    unknown keys forbidden) and the index names exactly the tensors of the shards;
(b) transformers loads OUT_DIR (sharded, indexed) with `CompressedTensorsConfig(dequantize=True)`
    with no missing, unexpected or mismatched keys; every quantized weight equals the one
    unpacked here with numpy from `weight_packed` / `weight_scale` (independent of our code),
    `(code − 2^(b−1))·scale` rounded to the model dtype, bit for bit; every other tensor equals
    the input model's bit for bit; quantized weights are close to the input's;
(c) the default (compressed) load path gives the same weights and the same logits.

Prints one line per check and a closing "N passed, N failed".
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="You passed `quantization_config`")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file as load_pt  # noqa: E402

import compressed_tensors  # noqa: E402
import transformers  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

transformers.utils.logging.disable_progress_bar()
RESULTS = {"passed": 0, "failed": 0}


def check(name, fn):
    t0 = time.time()
    try:
        detail = fn()
        RESULTS["passed"] += 1
        print(f"PASS {name} ({time.time() - t0:.1f}s){': ' + detail if detail else ''}", flush=True)
    except Exception:  # noqa: BLE001
        RESULTS["failed"] += 1
        print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    iv = INT_VIEW.get(a.dtype)
    return torch.equal(a.view(iv), b.view(iv)) if iv else torch.equal(a, b)


def shards(d: Path):
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return sorted(set(wm.values())), wm
    return ["model.safetensors"], None


def load_dir(d: Path, loader):
    files, wm = shards(d)
    out = {}
    located = {}
    for f in files:
        for k, v in loader(str(d / f)).items():
            assert k not in out, f"{k} in two files"
            out[k] = v
            located[k] = f
    if wm is not None:
        assert wm == located, "the index does not name exactly the tensors of the shards"
    return out


def unpack_ct(t: dict, module: str, bits: int, group: int) -> np.ndarray:
    """compressed-tensors pack-quantized, from its definition: element j of a row at bits
    [j*b, j*b+b) of the row's little-endian int32 stream; stored value = signed + 2^(b-1)."""
    rows, cols = (int(x) for x in t[f"{module}.weight_shape"].tolist())
    words = t[f"{module}.weight_packed"].numpy().view(np.uint32).astype(np.uint64)
    assert words.shape == (rows, -(-cols * bits // 32)), words.shape
    j = np.arange(cols)
    bit = j * bits
    w, off = bit // 32, (bit % 32).astype(np.uint64)
    lo = words[:, w] >> off
    nxt = np.minimum(w + 1, words.shape[1] - 1)
    hi = np.where(off + bits > 32, words[:, nxt] << (np.uint64(32) - off), 0)
    codes = ((lo | hi) & np.uint64((1 << bits) - 1)).astype(np.float32)
    return codes, (rows, cols)


def load_only(out_dir: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((out_dir / "config.json").read_text())
    QuantizationConfig.model_validate(config["quantization_config"])
    load_dir(out_dir, load_pt)
    ids = (torch.arange(24).reshape(2, 12) * 7) % config["vocab_size"]
    logits = []
    for kw in (dict(quantization_config=CompressedTensorsConfig(dequantize=True)), {}):
        m, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.bfloat16, output_loading_info=True, **kw)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), f"{key}: {info.get(key)}"
        with torch.no_grad():
            logits.append(m.eval()(ids).logits)
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1]), f"logits differ by {(logits[0] - logits[1]).abs().max()}"
    return f"{config['architectures'][0]}: both load paths, no missing/unexpected keys, same finite logits"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--load-only":
        check("(a)+(b)+(c) load only", lambda: load_only(Path(sys.argv[2])))
        print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
        sys.exit(1 if RESULTS["failed"] else 0)
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    out_dir, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    t0 = time.time()
    print(f"torch {torch.__version__}, compressed-tensors {compressed_tensors.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    config = json.loads((out_dir / "config.json").read_text())
    qc = config["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    bits, group = weights["num_bits"], weights["group_size"]
    assert weights["symmetric"], "this check covers symmetric checkpoints"
    model_dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")

    ours = {}

    def config_and_index():
        QuantizationConfig.model_validate(qc)
        ours.update(load_dir(out_dir, load_pt))
        n = sum(1 for k in ours if k.endswith("weight_packed"))
        return f"{len(ours)} tensors in {len(shards(out_dir)[0])} shard(s), {n} quantized modules, ignore {len(qc['ignore'])}"

    check("(a) quantization_config and index", config_and_index)

    inp = load_dir(model_dir, load_pt)
    quantized = {k[: -len(".weight_packed")] for k in ours if k.endswith(".weight_packed")}

    def expected():
        want = {}
        for name, v in inp.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            if module in quantized:
                codes, (rows, cols) = unpack_ct(ours, module, bits, group)
                scale_t = ours[module + ".weight_scale"]
                scale = scale_t.float().numpy()
                deq = (codes - float(1 << (bits - 1))) * np.repeat(scale, group, axis=1)[:, :cols]
                want[name] = torch.from_numpy(deq.astype(np.float32)).to(scale_t.dtype).to(model_dtype)
            else:
                want[name] = v
        return want

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    def load(**kw):
        model, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=model_dtype, output_loading_info=True, **kw)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), f"{key}: {info.get(key)}"
        return model.eval()

    state = {}

    def dequantized_load():
        want = expected()
        m = load(quantization_config=CompressedTensorsConfig(dequantize=True))
        sd = m.state_dict()
        assert set(sd) == set(want), f"keys differ: {sorted(set(sd) ^ set(want))[:10]}"
        worst = 0.0
        for k, v in want.items():
            assert bit_equal(sd[k], v), f"{k} differs"
            if k[: -len(".weight")] in quantized:
                w0 = inp[k].float()
                rel = ((sd[k].float() - w0).pow(2).sum() / w0.pow(2).sum()).item()
                worst = max(worst, rel)
        assert worst < 0.2, f"a quantized weight is far from the input (relative error {worst})"
        state["m1"] = m
        state["want"] = want
        return f"{len(quantized)} quantized + {len(want) - len(quantized)} dense tensors equal bit for bit; max relative weight error {worst:.3e}"

    check("(b) transformers load, dequantize=True", dequantized_load)

    def lazy_load():
        m2 = load()
        ids = (torch.arange(24).reshape(2, 12) * 7) % config["vocab_size"]
        with torch.no_grad():
            l2 = m2(ids).logits
            l1 = state["m1"](ids).logits
        sd2 = m2.state_dict()
        for k, v in state["want"].items():
            assert bit_equal(sd2[k], v), f"{k} differs after decompression"
        assert torch.equal(l1, l2), f"logits differ by {(l1 - l2).abs().max()}"
        assert torch.isfinite(l1).all()
        return "same weights and logits"

    check("(c) transformers default (compressed) load + forward", lazy_load)
    print(f"checks took {time.time() - t0:.1f}s")
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    sys.exit(1 if RESULTS["failed"] else 0)


if __name__ == "__main__":
    main()
