"""PyTorch's int4 weight-only matmul (`torch._weight_int4pack_mm`, group size 128, bf16) timed
the way `cargo bench --bench gpu_w4a16` times ours: a CUDA graph of back-to-back launches that
cycle over enough weight copies (> 200 MB) that every launch reads its weight from HBM; CUDA
events around graph replays, median of 7, divided by the launches per graph.

Run on the GPU machine with PyTorch: `python3 tools/device/torch_int4_bench.py`. Prints one
line per (shape, M); the issue's comparison "faster than PyTorch's int4 kernel at every M".
`TORCH_INT4_ONLY=4096x1024:1,8192x8192:2` times only those cases (like `W4A16_BENCH_ONLY`).
"""
import os

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (2048, 7168), (7168, 2048)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GS = 128
CYCLE_BYTES = 200 << 20


def packed_weight(n, k, dev):
    w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
    try:  # torch >= 2.5 takes uint8 [n, k/2]
        wp = torch._convert_weight_to_int4pack((w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8), 8)
    except Exception:
        wp = torch._convert_weight_to_int4pack(w, 8)
    sz = (torch.rand(k // GS, n, 2, device=dev) * 0.01).to(torch.bfloat16)
    return wp, sz


def time_graph(fn, reps):
    for i in range(4):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / reps)
    return sorted(ts)[3]


def main():
    dev = "cuda"
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    only = [c.split(":") for c in os.environ.get("TORCH_INT4_ONLY", "").split(",") if c]
    cases = [(tuple(int(d) for d in s.split("x")), [int(m)]) for s, m in only] or [(s, MS) for s in SHAPES]
    for (n, k), ms in cases:
        copies = max(2, -(-CYCLE_BYTES // (n * k // 2)))
        ws = [packed_weight(n, k, dev) for _ in range(copies)]
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            reps = max(copies, 24) if m < 1024 else copies
            t = time_graph(lambda i: torch._weight_int4pack_mm(x, ws[i % copies][0], GS, ws[i % copies][1]), reps)
            print(f"torch int4 {n}x{k} M {m}: {t:.2f} us", flush=True)


if __name__ == "__main__":
    main()
