#!/usr/bin/env python3
"""Parity fixtures from Hugging Face transformers' own modelling code.

For each architecture this writes testdata/parity/<name>/:
  config.json           the Hub-style config (rope_theta + rope_scaling), as real checkpoints ship it
  model.safetensors     random weights in bf16 under the Hub's tensor names (per-expert Linears);
                        transformers loads them with from_pretrained, which must report no
                        missing or unexpected key, so the names are proven against the library
  activations.safetensors  f32, per sequence s (no padding: each sequence runs alone):
      s{s}.input_ids            i64 [seq]
      s{s}.hidden.{l}           input of decoder layer l (l = 0: the embedding), and
                                s{s}.hidden.{L} the last layer's output
      s{s}.logits               final norm + lm_head
      s{s}.in.{l}.{group}       the input rows of every Linear group, recorded by wrapping
                                torch.nn.functional.linear while the model runs (groups: qkv, o,
                                gate_up, down, e{k}.gate_up, e{k}.down; experts only with the
                                tokens the model routed to them)
and testdata/parity/tokenizer/: a tiny byte-level BPE tokenizer.json trained with the
`tokenizers` library plus the ids it gives for a sample text (tokenizer_expected.json).

Usage (see testdata/parity/README.md for the pinned versions):
  python3 -m venv tools/parity/.venv
  tools/parity/.venv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors numpy
  tools/parity/.venv/bin/python tools/parity/gen_fixtures.py
"""

import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "testdata", "parity")
SEQ_LENS = [16, 9]

COMMON = dict(
    # hidden 32 keeps all fixtures near 600 KB; head_dim 8 still gives llama3's three bands.
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
    hidden_act="silu",
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHS = {
    # Llama 3.1-style band-wise RoPE scaling; the bands fall inside head_dim 16 with these numbers.
    "llama": dict(
        COMMON,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        intermediate_size=64,
        rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    ),
    # A sliding window shorter than the first sequence.
    "mistral": dict(
        COMMON,
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        intermediate_size=64,
        rms_norm_eps=1e-5,
        sliding_window=6,
        tie_word_embeddings=False,
    ),
    # q/k/v bias, tied embeddings.
    "qwen2": dict(
        COMMON,
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        intermediate_size=64,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        tie_word_embeddings=True,
    ),
    # Per-head q/k norm, explicit head_dim (16) != hidden/heads (8), YaRN scaling.
    "qwen3": dict(
        COMMON,
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        intermediate_size=64,
        head_dim=16,
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
        tie_word_embeddings=False,
    ),
    # Layer 0 dense (mlp_only_layers), layer 1 MoE; softmax-then-top-k without renormalising.
    "qwen3_moe": dict(
        COMMON,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        head_dim=8,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
    ),
    # block_sparse_moe, w1/w3/w2, renormalised top-2.
    "mixtral": dict(
        COMMON,
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def layer_is_moe(cfg, i):
    t = cfg["model_type"]
    if t == "mixtral":
        return True
    if t == "qwen3_moe":
        return i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0
    return False


def hub_weights(cfg, gen):
    """Random weights under the Hub's names; scales keep every layer well inside its
    nonlinear range (unit-variance activations) rather than near identity."""
    h, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    t = cfg["model_type"]

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=gen)

    w = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h, generator=gen),
         "model.norm.weight": norm(h)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(cfg["vocab_size"], h)
    qkv_bias = t == "qwen2" or cfg.get("attention_bias", False)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        a = p + "self_attn."
        w[a + "q_proj.weight"] = lin(nh * hd, h)
        w[a + "k_proj.weight"] = lin(nkv * hd, h)
        w[a + "v_proj.weight"] = lin(nkv * hd, h)
        w[a + "o_proj.weight"] = lin(h, nh * hd)
        if qkv_bias:
            for n, o in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[a + f"{n}_proj.bias"] = 0.1 * torch.randn(o, generator=gen)
        if t in ("qwen3", "qwen3_moe"):
            w[a + "q_norm.weight"] = norm(hd)
            w[a + "k_norm.weight"] = norm(hd)
        if layer_is_moe(cfg, i):
            n_exp = cfg.get("num_experts") or cfg.get("num_local_experts")
            inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
            base = p + ("block_sparse_moe." if t == "mixtral" else "mlp.")
            # A sharper router keeps the top-2 choice far from ties.
            w[base + "gate.weight"] = 3.0 * lin(n_exp, h)
            for e in range(n_exp):
                x = base + f"experts.{e}."
                names = ("w1", "w3", "w2") if t == "mixtral" else ("gate_proj", "up_proj", "down_proj")
                w[x + names[0] + ".weight"] = lin(inter, h)
                w[x + names[1] + ".weight"] = lin(inter, h)
                w[x + names[2] + ".weight"] = lin(h, inter)
        else:
            inter = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"] = lin(inter, h)
            w[p + "mlp.up_proj.weight"] = lin(inter, h)
            w[p + "mlp.down_proj.weight"] = lin(h, inter)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}


def pointer_table(model, cfg):
    """data_ptr of each Linear weight (expert slices of the fused v5 tensors included) →
    (layer, group); q/k/v share 'qkv', gate/up share 'gate_up'."""
    table = {}
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        table[at.q_proj.weight.data_ptr()] = (i, "qkv")
        table[at.k_proj.weight.data_ptr()] = (i, "qkv")
        table[at.v_proj.weight.data_ptr()] = (i, "qkv")
        table[at.o_proj.weight.data_ptr()] = (i, "o")
        moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
        if hasattr(moe, "experts"):
            ex = moe.experts
            for e in range(ex.gate_up_proj.shape[0]):
                table[ex.gate_up_proj[e].data_ptr()] = (i, f"e{e}.gate_up")
                table[ex.down_proj[e].data_ptr()] = (i, f"e{e}.down")
        else:
            table[moe.gate_proj.weight.data_ptr()] = (i, "gate_up")
            table[moe.up_proj.weight.data_ptr()] = (i, "gate_up")
            table[moe.down_proj.weight.data_ptr()] = (i, "down")
    return table


def run_sequence(model, cfg, ids):
    table = pointer_table(model, cfg)
    recorded = {}
    original_linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        key = table.get(weight.data_ptr())
        if key is not None:
            # q/k/v (gate/up) read the same input: keep it once per call site group.
            if key not in recorded or key[1] in ("o", "down") or key[1].endswith(".down"):
                recorded[key] = x.detach().reshape(-1, x.shape[-1]).clone()
            elif not torch.equal(recorded[key], x.detach().reshape(-1, x.shape[-1])):
                raise RuntimeError(f"{key}: members of one input group saw different inputs")
        return original_linear(x, weight, bias)

    hidden = {}
    hooks = [model.model.embed_tokens.register_forward_hook(
        lambda m, a, out: hidden.__setitem__(0, out.detach().clone()))]
    for i, layer in enumerate(model.model.layers):
        def hook(m, a, out, i=i):
            o = out[0] if isinstance(out, tuple) else out
            hidden[i + 1] = o.detach().clone()
        hooks.append(layer.register_forward_hook(hook))
    torch.nn.functional.linear = recording_linear
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None, :], use_cache=False)
    finally:
        torch.nn.functional.linear = original_linear
        for h in hooks:
            h.remove()
    return out.logits[0].float(), {k: v[0].float() for k, v in hidden.items()}, recorded


def make_arch(name, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    weights = hub_weights(cfg, gen)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    model, info = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"{name}: transformers did not load every Hub tensor name: {bad}")
    if getattr(model.config, "_experts_implementation", "eager") not in (None, "eager"):
        raise RuntimeError(f"{name}: experts implementation is {model.config._experts_implementation}")
    model.eval()

    tensors = {}
    for s, n in enumerate(SEQ_LENS):
        ids = torch.randint(3, cfg["vocab_size"], (n,), generator=gen)
        ids[0] = cfg["bos_token_id"]
        logits, hidden, recorded = run_sequence(model, cfg, ids)
        tensors[f"s{s}.input_ids"] = ids.to(torch.int64)
        tensors[f"s{s}.logits"] = logits.contiguous()
        for l, hs in hidden.items():
            tensors[f"s{s}.hidden.{l}"] = hs.contiguous()
        for (l, g), x in recorded.items():
            tensors[f"s{s}.in.{l}.{g}"] = x.float().contiguous()
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": str(seed)}
    save_file(tensors, os.path.join(out_dir, "activations.safetensors"), metadata=meta)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"{name}: {size} bytes, groups {sorted({k.split('.', 2)[2] for k in tensors if '.in.' in k})}")


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = os.path.join(ROOT, "tokenizer")
    os.makedirs(out_dir, exist_ok=True)
    # The Llama 3 / Qwen2 split pattern (needs look-ahead: Oniguruma in both implementations).
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Quantization maps each weight to one of a few levels; GPTQ chooses them column by column.",
        "The Hessian of a linear layer's reconstruction error is 2/n times X transpose X.",
        "Mixture-of-experts layers route every token to its top-k experts, 2 of 8 here.",
        "Calibration text: 1234 numbers, punctuation!? and    spaces\n\nnew paragraphs, émigré café.",
    ] * 4
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    samples = [
        "GPTQ quantizes the Hessian of 8 experts, don't it?\n\nCafé 2048 tokens   here.",
        "Unseen words: zebra xylophone 99999 ++ -- éé",
    ]
    expected = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in samples]
    import tokenizers
    with open(os.path.join(out_dir, "tokenizer_expected.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "samples": expected}, f, indent=1)
        f.write("\n")
    print(f"tokenizer: vocab {tok.get_vocab_size()}")


def main():
    torch.manual_seed(0)
    for k, (name, cfg) in enumerate(ARCHS.items()):
        make_arch(name, cfg, seed=1000 + k)
    make_tokenizer()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
