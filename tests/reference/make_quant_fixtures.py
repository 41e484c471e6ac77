#!/usr/bin/env python3
"""Golden fixtures for the fake quantizers (tests/test_fake_quant.cpp, suite FakeQuantFixtures).

A straightforward PyTorch transcription of the reference code's UniformAffineQuantizer (OmniQuant,
quantize/quantizer.py: min-max per group, LWC sigmoid factors, `round_ste` for x/scale, a plain
`.round()` for the zero point) on a few deterministic random tensors, with autograd for the
gradients. float32 on the CPU, so the output is deterministic and independent of the GPU.

One deliberate detail: sigma(gamma) is evaluated in float64 and rounded to float32, exactly as omniq
does on both backends (ops/fake_quant.h explains why); PyTorch's float32 sigmoid differs from it by
at most one ulp, which would only make the comparison noisier, not different in meaning.

Writes <out>/index.json and little-endian float32 .bin files (total < 1 MB):
  - weights w0 [16, 256] (small normal values with a few outliers) and w1 [6, 384] (rows shifted so
    some groups lie entirely above or below 0);
  - RTN x-hat for W4, W4 g128, W3, W3 g128, W2 g128, W2 g64 (group 0 = per output channel) for both;
  - for w0 with LWC: gamma = beta = 4 (the init) and random gamma, beta: x-hat and the gradients of
    sum(dy * x-hat) for a fixed dy w.r.t. gamma, beta (and w, for the random case);
  - per-token activation fake-quant of a random [64, 256] at 4 and 8 bits: y and dx for a fixed dy.

usage: make_quant_fixtures.py [--out tests/fixtures/quant]
"""
import argparse
import json
import os
import struct

import torch

CLIPMIN = 1e-5
SETTINGS = [(4, 0), (4, 128), (3, 0), (3, 128), (2, 128), (2, 64)]  # (bits, group size; 0 = per channel)


def round_ste(x):
    """Straight-through round (reference code): forward round half to even, gradient 1."""
    return (x.round() - x).detach() + x


def sigmoid_f32_from_f64(p):
    return torch.sigmoid(p.double()).float()


def fake_quant(x, bits, group=None, gamma=None, beta=None):
    """UniformAffineQuantizer.forward, asymmetric, dynamic per-group/per-token min-max, optional LWC.

    x: [out, in] with group = in (per channel) or a divisor of in, or [..., C] with group None
    (per token: each row of the last dim is a group). gamma, beta: [groups, 1] or None.
    """
    shape = x.shape
    if group:
        x = x.reshape(-1, group)
    xmin = x.amin(-1, keepdim=True)
    xmax = x.amax(-1, keepdim=True)
    if gamma is not None:
        xmax = sigmoid_f32_from_f64(gamma) * xmax
        xmin = sigmoid_f32_from_f64(beta) * xmin
    qmax = 2 ** bits - 1
    scale = ((xmax - xmin) / qmax).clamp(min=CLIPMIN, max=1e4)
    round_zero_point = (-xmin / scale).clamp(min=-1e4, max=1e4).round()  # .round(): zero gradient
    x_int = round_ste(x / scale) + round_zero_point
    x_int = x_int.clamp(0, qmax)
    x_dequant = (x_int - round_zero_point) * scale
    return x_dequant.reshape(shape)


class Writer:
    def __init__(self, out):
        self.out = out
        self.tensors = {}
        self.total = 0

    def add(self, key, t):
        t = t.detach().to(torch.float32).contiguous().cpu()
        values = t.reshape(-1).tolist()
        data = struct.pack("<%df" % len(values), *values)
        fname = key + ".bin"
        with open(os.path.join(self.out, fname), "wb") as f:
            f.write(data)
        self.tensors[key] = {"file": fname, "shape": list(t.shape)}
        self.total += len(data)
        return key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "quant"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(2024)
    wr = Writer(args.out)

    # Weights: LLaMA-like small normal values with a few large outliers; w1 has row offsets so
    # that some groups do not contain 0 (negative or large zero points).
    w0 = torch.randn(16, 256, generator=gen) * 0.02
    idx = torch.randint(0, w0.numel(), (12,), generator=gen)
    w0.view(-1)[idx] *= 8.0
    w1 = torch.randn(6, 384, generator=gen) * 0.01
    w1 += torch.tensor([0.05, -0.05, 0.0, 0.02, -0.03, 0.0]).unsqueeze(1)
    weights = {"w0": w0, "w1": w1}
    for name, w in weights.items():
        wr.add(name, w)
    dy_w0 = torch.randn(w0.shape, generator=gen)
    wr.add("dy_w0", dy_w0)

    cases = []
    for name, w in weights.items():
        for bits, group in SETTINGS:
            key = "%s_w%d_g%d_rtn" % (name, bits, group)
            y = fake_quant(w, bits, group or w.shape[1])
            cases.append({"name": key, "weight": name, "bits": bits, "group_size": group,
                          "y": wr.add(key + "_y", y)})

    ngroups = {g: w0.shape[0] * (w0.shape[1] // (g or w0.shape[1])) for _, g in SETTINGS}
    for init in ("gamma4", "random"):
        for bits, group in SETTINGS:
            key = "w0_w%d_g%d_%s" % (bits, group, init)
            n = ngroups[group]
            if init == "gamma4":
                gamma = torch.full((n, 1), 4.0)
                beta = torch.full((n, 1), 4.0)
            else:
                gamma = torch.rand(n, 1, generator=gen) * 6.0 - 1.0
                beta = torch.rand(n, 1, generator=gen) * 6.0 - 1.0
            gamma.requires_grad_(True)
            beta.requires_grad_(True)
            w = w0.clone().requires_grad_(init == "random")
            y = fake_quant(w, bits, group or w.shape[1], gamma, beta)
            (y * dy_w0).sum().backward()
            case = {"name": key, "weight": "w0", "bits": bits, "group_size": group, "dy": "dy_w0",
                    "gamma": wr.add(key + "_gamma", gamma), "beta": wr.add(key + "_beta", beta),
                    "y": wr.add(key + "_y", y), "dgamma": wr.add(key + "_dgamma", gamma.grad),
                    "dbeta": wr.add(key + "_dbeta", beta.grad)}
            if init == "random":
                case["dw"] = wr.add(key + "_dw", w.grad)
            cases.append(case)

    # Activations: per-token rows with outlier channels and per-row offsets (as LLM activations).
    x = torch.randn(64, 256, generator=gen)
    x[:, torch.randint(0, 256, (4,), generator=gen)] *= 20.0
    x += torch.randn(64, 1, generator=gen)
    dy_x = torch.randn(64, 256, generator=gen)
    wr.add("x_act", x)
    wr.add("dy_act", dy_x)
    act_cases = []
    for bits in (4, 8):
        xr = x.clone().requires_grad_(True)
        y = fake_quant(xr, bits)
        (y * dy_x).sum().backward()
        key = "act_a%d" % bits
        act_cases.append({"name": key, "x": "x_act", "dy": "dy_act", "bits": bits,
                          "y": wr.add(key + "_y", y), "dx": wr.add(key + "_dx", xr.grad)})

    index = {"generator": "tests/reference/make_quant_fixtures.py", "torch": torch.__version__,
             "format": "little-endian float32, row-major", "tensors": wr.tensors,
             "weight_cases": cases, "act_cases": act_cases}
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    assert wr.total < 1 << 20, "fixtures too large: %d bytes" % wr.total
    print("wrote %d tensors, %d bytes, to %s" % (len(wr.tensors), wr.total, args.out))


if __name__ == "__main__":
    main()
