#!/usr/bin/env python3
"""Time PyTorch's own attention kernels at one LLaMA attention shape, for comparison with omniq's flash
attention (`bench/bench_matmul` prints ours): F.scaled_dot_product_attention with one backend forced at
a time (FlashAttention-2, cuDNN, memory-efficient), causal, bf16.

The backward time is (forward + backward) - forward, so it includes each backend's own preprocessing
and conversion kernels. FLOP/s count the causally useful half of the score matrix, as bench_matmul
does (backward = 2.5 x forward).

    python3 tests/reference/time_sdpa_backends.py                      # LLaMA-2-7B: H 32, T 2048, D 128
    python3 tests/reference/time_sdpa_backends.py --heads 64 --reps 30
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(f, reps):
    for _ in range(5):
        f()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        f()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("time_sdpa_backends: no CUDA device visible")
    B, H, T, D = a.batch, a.heads, a.tokens, a.head_dim
    q, k, v = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flop_fwd = 4 * B * H * T * T * D / 2
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, "
          f"B={B} H={H} T={T} D={D} causal bf16")
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.reps)

                def fwd_bwd():
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.autograd.grad(out, (q, k, v), dout)

                both = time_ms(fwd_bwd, a.reps)
            bwd = both - fwd
            print(f"{name:10s} forward {fwd * 1000:7.1f} us ({flop_fwd / fwd / 1e9:6.1f} TFLOP/s)  "
                  f"backward {bwd * 1000:7.1f} us ({2.5 * flop_fwd / bwd / 1e9:6.1f} TFLOP/s)")
        except RuntimeError as e:  # a backend unavailable for this shape / build
            print(f"{name:10s} unavailable: {str(e).splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
