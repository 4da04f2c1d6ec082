#!/usr/bin/env python3
"""Checks 4Bit Forge checkpoints against the real libraries (issue 12).

Reads the fixtures `cargo run --release --example interop_fixtures` writes and checks:

(a) compressed-tensors: `PackedQuantizationCompressor.decompress` of every single-Linear
    case equals our dequantized weight, bit for bit in the scale dtype; its own
    `pack_to_int32` of our codes / zero points gives our packed words, and its
    `unpack_from_int32` gives our codes back; the `quantization_config` validates as a
    `QuantizationConfig` (pydantic, unknown keys forbidden).
(b) transformers: the tiny Llama checkpoints, and a whole `forge quantize` output directory
    (sharded, with its index), load with `AutoModelForCausalLM.from_pretrained`
    with no missing, unexpected or mismatched keys, both dequantized at load
    (`CompressedTensorsConfig(dequantize=True)`, formerly `run_compressed=False`) and
    compressed then decompressed on the first forward (the default); every weight equals ours
    and both give the same logits.
(c) GPTQ: an unpacker written here from the AutoGPTQ / GPTQModel layout (numpy only: shifts
    per word, GPTQ's 10|1|10|1|10 table for 3 bits, `zero = field + 1` for v1) turns every
    GPTQ case and the GPTQ Llama into our codes, zero points, scales and weights; its
    config parses as transformers' `GPTQConfig`.

Usage: check.py FIXTURE_DIR. Prints one line per check and a closing "N passed, N failed".
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

# from_pretrained warns that the passed CompressedTensorsConfig only sets loading attributes.
warnings.filterwarnings("ignore", message="You passed `quantization_config`")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file as load_np  # noqa: E402
from safetensors.torch import load_file as load_pt  # noqa: E402

import compressed_tensors  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
from compressed_tensors.compressors import PackedQuantizationCompressor, pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

RESULTS = {"passed": 0, "failed": 0}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def check(name, fn):
    t0 = time.time()
    try:
        detail = fn()
        RESULTS["passed"] += 1
        print(f"PASS {name}{' — ' + detail if detail else ''} ({time.time() - t0:.2f}s)", flush=True)
    except Exception as e:  # report every failure, keep going
        RESULTS["failed"] += 1
        print(f"FAIL {name}: {e}", flush=True)
        traceback.print_exc(limit=3)


def bit_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    va, vb = a.contiguous().view(INT_VIEW[a.dtype]), b.contiguous().view(INT_VIEW[b.dtype])
    if not torch.equal(va, vb):
        bad = (va != vb).nonzero()[:3].tolist()
        first = tuple(bad[0])
        raise AssertionError(f"{what}: {int((va != vb).sum())} elements differ, e.g. at {first}: {a[first]} vs {b[first]}")


# ------------------------------------------------------------------------------------------
# (a) compressed-tensors
# ------------------------------------------------------------------------------------------


def ct_case(lin_dir: Path, case: dict):
    rows, cols, bits = case["rows"], case["cols"], case["bits"]
    dtype = getattr(torch, case["scale_dtype"])
    qc = QuantizationConfig.model_validate(case["quantization_config"])
    assert qc.format == "pack-quantized", qc.format
    scheme = qc.config_groups["group_0"]
    prefix = case["module"] + "."
    local = {k[len(prefix):]: v for k, v in load_pt(str(lin_dir / case["file"])).items()}
    exp = load_pt(str(lin_dir / case["expected"]))
    expected_keys = {"weight_packed", "weight_scale", "weight_shape"} | ({"weight_zero_point"} if not case["symmetric"] else set())
    assert set(local) == expected_keys, sorted(local)
    assert set(PackedQuantizationCompressor.compression_param_names(scheme)) == expected_keys

    out = PackedQuantizationCompressor.decompress(dict(local), scheme)
    w = out["weight"]
    bit_equal(w, exp["dequant"].to(dtype), "decompressed weight")

    # Their packer on our codes and zero points, their unpacker on our words.
    offset = 1 << (bits - 1)
    signed = (exp["codes"].to(torch.int16) - offset).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, bits), local["weight_packed"]), "pack_to_int32(codes) != weight_packed"
    assert torch.equal(unpack_from_int32(local["weight_packed"], bits, torch.Size([rows, cols])), signed)
    zp = None
    if not case["symmetric"]:
        zp = (exp["zeros"].to(torch.int32) - offset).to(torch.int8)
        theirs = pack_to_int32(zp, bits, packed_dim=0)
        assert torch.equal(theirs, local["weight_zero_point"]), "pack_to_int32(zeros, packed_dim=0) != weight_zero_point"

    # Their compressor, given our dequantized weight, scales and zero points, writes our tensors.
    state = {"weight": exp["dequant"], "weight_scale": local["weight_scale"]}
    if zp is not None:
        state["weight_zero_point"] = zp
    written = PackedQuantizationCompressor.compress(state, scheme)
    assert set(written) == expected_keys, sorted(written)
    for k in expected_keys:
        assert torch.equal(written[k], local[k]), f"compress() wrote a different {k}"
    return f"{rows}x{cols} {w.dtype}"


# ------------------------------------------------------------------------------------------
# (c) GPTQ, unpacked independently (AutoGPTQ / GPTQModel layout)
# ------------------------------------------------------------------------------------------


def gptq_unpack_axis0(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [K, N] packed along axis 0 -> uint32 [K*32/bits, N] values."""
    q = words.view(np.uint32)
    k, n = q.shape
    maxq = np.uint32((1 << bits) - 1)
    if bits in (2, 4, 8):
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        return ((q[:, None, :] >> shifts[None, :, None]) & maxq).reshape(k * (32 // bits), n)
    if bits == 3:
        # Three words hold 32 values: 10 | 1 | 10 | 1 | 10 (GPTQModel's wf table for 3 bits).
        a, b, c = q.reshape(k // 3, 3, n).transpose(1, 0, 2)
        out = np.zeros((k // 3, 32, n), dtype=np.uint32)
        for i in range(10):
            out[:, i] = (a >> np.uint32(3 * i)) & 7
            out[:, 11 + i] = (b >> np.uint32(3 * i + 1)) & 7
            out[:, 22 + i] = (c >> np.uint32(3 * i + 2)) & 7
        out[:, 10] = ((a >> np.uint32(30)) & 3) | ((b & 1) << np.uint32(2))
        out[:, 21] = ((b >> np.uint32(31)) & 1) | ((c & 3) << np.uint32(1))
        return out.reshape(k // 3 * 32, n)
    raise ValueError(f"GPTQ has no {bits}-bit layout")


def gptq_linear(t: dict, module: str, bits: int, v1: bool):
    """(codes [out,in], zeros [out,groups], scales f16 [out,groups], weight f16 [out,in])."""
    qweight, qzeros = t[f"{module}.qweight"], t[f"{module}.qzeros"]
    scales, g_idx = t[f"{module}.scales"], t[f"{module}.g_idx"].astype(np.int64)
    assert qweight.dtype == np.int32 and qzeros.dtype == np.int32 and scales.dtype == np.float16
    w = gptq_unpack_axis0(qweight, bits)  # [in, out]
    z = gptq_unpack_axis0(np.ascontiguousarray(qzeros.T), bits).T  # [groups, out]
    if v1:
        z = z + 1
    assert g_idx.shape == (w.shape[0],)
    deq = (w.astype(np.float16) - z[g_idx].astype(np.float16)) * scales[g_idx]
    return w.T, z.T, scales.T, deq.T


def gptq_case(lin_dir: Path, case: dict):
    rows, cols, bits = case["rows"], case["cols"], case["bits"]
    t = load_np(str(lin_dir / case["file"]))
    exp = load_np(str(lin_dir / case["expected"]))
    codes, zeros, scales, deq = gptq_linear(t, "layer", bits, case["format"] == "gptq")
    gs = case["group_size"] or cols
    assert np.array_equal(t["layer.g_idx"], np.arange(cols, dtype=np.int32) // gs), "g_idx is not col // group_size"
    assert codes.shape == (rows, cols)
    assert np.array_equal(codes, exp["codes"].astype(np.uint32)), "codes differ"
    assert np.array_equal(zeros, exp["zeros"].astype(np.uint32)), "zero points differ"
    assert np.array_equal(scales.astype(np.float32), exp["scales"]), "scales differ"
    want = exp["dequant"].astype(np.float16)
    if not np.array_equal(deq.view(np.uint16), want.view(np.uint16)):
        raise AssertionError(f"{int((deq != want).sum())} dequantized values differ")
    cfg = case["quantization_config"]
    assert (cfg["bits"], cfg["sym"], cfg["desc_act"], cfg["checkpoint_format"]) == (bits, case["symmetric"], False, case["format"])
    return f"{rows}x{cols}"


def gptq_llama(d: Path):
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    qcfg = json.loads((d / "quantize_config.json").read_text())
    assert cfg == qcfg, "quantize_config.json differs from config.json's quantization_config"
    tc = transformers.GPTQConfig.from_dict(dict(cfg))
    assert (tc.bits, tc.group_size, tc.sym, tc.desc_act, tc.format) == (cfg["bits"], cfg["group_size"], cfg["sym"], False, cfg["format"])
    t = load_np(str(d / "model.safetensors"))
    exp = load_np(str(d / "expected.safetensors"))
    modules = sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight"))
    assert len(modules) == 14, modules
    for m in modules:
        _, _, _, deq = gptq_linear(t, m, cfg["bits"], cfg["format"] == "gptq")
        want = exp[f"{m}.weight"].astype(np.float16)
        assert np.array_equal(deq.view(np.uint16), want.view(np.uint16)), f"{m}: weights differ"
    dense = [k for k in exp if not any(k.startswith(m + ".") for m in modules)]
    for k in dense:
        assert np.array_equal(t[k].view(np.uint16), exp[k].view(np.uint16)), k
    return f"{len(modules)} quantized modules, {len(dense)} dense tensors; GPTQConfig(format={tc.format})"


# ------------------------------------------------------------------------------------------
# (b) transformers
# ------------------------------------------------------------------------------------------


def llama_ct(d: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((d / "config.json").read_text())
    model_dtype = getattr(torch, config.get("dtype") or config["torch_dtype"])
    shards = sorted(p for p in d.glob("*.safetensors") if p.name != "expected.safetensors")
    scale_dtype = next(v.dtype for p in shards for k, v in load_pt(str(p)).items() if k.endswith("weight_scale"))
    exp = load_pt(str(d / "expected.safetensors"))
    quantized = {k for k in exp if k.endswith("_proj.weight")}
    want = {k: (v.to(scale_dtype).to(model_dtype) if k in quantized else v) for k, v in exp.items()}

    def load(**kw):
        model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=model_dtype, output_loading_info=True, **kw)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            assert not info.get(key), f"{key}: {info.get(key)}"
        return model.eval()

    ids = (torch.arange(24).reshape(2, 12) * 7) % config["vocab_size"]

    # Dequantized while loading (run_compressed=False / dequantize=True).
    m1 = load(quantization_config=CompressedTensorsConfig(dequantize=True))
    sd1 = m1.state_dict()
    assert set(sd1) == set(want), f"keys differ: {sorted(set(sd1) ^ set(want))}"
    for k, v in want.items():
        bit_equal(sd1[k], v, k)

    # Compressed on load, decompressed by compressed-tensors on the first forward.
    try:
        m2 = load()
    except RuntimeError as e:
        if config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"]:
            raise
        return lazy_asym_limitation(d, model_dtype, quantized, e)
    packed = [k for k in m2.state_dict() if k.endswith("weight_packed")]
    assert len(packed) == len(quantized), f"{len(packed)} packed modules on load, expected {len(quantized)}"
    with torch.no_grad():
        logits2 = m2(ids).logits
        logits1 = m1(ids).logits
    sd2 = m2.state_dict()
    for k, v in want.items():
        bit_equal(sd2[k], v, f"{k} (decompressed on forward)")
    assert torch.equal(logits1, logits2), f"logits differ by {(logits1 - logits2).abs().max()}"
    assert torch.isfinite(logits1).all()
    return f"{len(quantized)} quantized + {len(want) - len(quantized)} dense tensors, model {model_dtype}, scales {scale_dtype}"


def lazy_asym_limitation(d: Path, model_dtype, quantized, err):
    """The default (compressed) load path of an asymmetric checkpoint.

    transformers builds the model on the meta device and calls compressed-tensors'
    `compress()`, whose meta branch keeps `weight_zero_point` unpacked `[out, groups]`, while
    its real-tensor branch (what llm-compressor writes, and what check (a) shows we write)
    packs it to `[ceil(out*bits/32), groups]`. So this path refuses every asymmetric
    pack-quantized checkpoint. Accept exactly that failure, and nothing else.
    """
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(
        str(d), dtype=model_dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    mism = info["mismatched_keys"]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    bits = json.loads((d / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"]
    assert len(mism) == len(quantized), f"{len(mism)} mismatches for {len(quantized)} modules: {err}"
    for key, ckpt, model in mism:
        assert key.endswith(".weight_zero_point"), key
        out, groups = model
        assert tuple(ckpt) == (-(-out * bits // 32), groups), (key, ckpt, model)
    print(f"NOTE {d.name}: the default (lazy) load path refuses asymmetric pack-quantized checkpoints: "
          f"compressed-tensors {compressed_tensors.__version__} builds weight_zero_point unpacked [out, groups] on "
          "the meta device but packs it [ceil(out*bits/32), groups] when compressing real tensors "
          "(upstream limitation; every mismatch is exactly that). The dequantize=True path above loads it.",
          flush=True)
    return f"{len(quantized)} quantized modules via dequantize=True; lazy path: upstream zero-point limitation"


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    root = Path(sys.argv[1])
    t0 = time.time()
    print(f"torch {torch.__version__}, compressed-tensors {compressed_tensors.__version__}, "
          f"transformers {transformers.__version__}, numpy {np.__version__}", flush=True)
    lin_dir = root / "linear"
    cases = json.loads((lin_dir / "cases.json").read_text())
    for case in cases:
        if case["format"] == "compressed-tensors":
            check(f"(a) compressed-tensors {case['id']}", lambda c=case: ct_case(lin_dir, c))
    for d in ("llama_ct_w4g32_sym", "llama_ct_w3g64_asym", "forge_demo_ct"):
        check(f"(b) transformers {d}", lambda d=d: llama_ct(root / d))
    for case in cases:
        if case["format"] in ("gptq", "gptq_v2"):
            check(f"(c) gptq {case['id']}", lambda c=case: gptq_case(lin_dir, c))
    check("(c) gptq llama_gptq_w4g32", lambda: gptq_llama(root / "llama_gptq_w4g32"))
    print(f"checks took {time.time() - t0:.1f}s")
    print(f"{RESULTS['passed']} passed, {RESULTS['failed']} failed")
    sys.exit(1 if RESULTS["failed"] else 0)


if __name__ == "__main__":
    main()
