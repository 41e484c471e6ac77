#!/usr/bin/env python3
"""A straightforward PyTorch GPTQ (Frantar et al. 2022, the reference code's `fasterquant`), the
reference omniq's `--method gptq` must match in WikiText-2 perplexity within 0.5% (issue 5).

Per decoder layer, sequentially: the layer inputs of all calibration windows are captured (the
usual Catcher on layer 0, then each quantized layer's outputs feed the next); inside a layer the
Linears are quantized in input groups in forward order (LLaMA {q,k,v} {o} {gate,up} {down}; OPT
{q,k,v} {out} {fc1} {fc2}), each group's H built from inputs produced by the already-quantized
earlier groups, exactly as quant/gptq.cpp.

Differences from the original GPTQ code, on purpose (omniq does the same):
  * the quantizer is omniq's RTN / OmniQuant's UniformAffineQuantizer (asymmetric min-max, the range
    is NOT forced to contain 0, scale clamp [1e-5, 1e4]) instead of GPTQ's Quantizer;
  * H = 2/n·ΣXᵀX with n counted in tokens (GPTQ counts samples; a constant factor, GPTQ is invariant).
Calibration windows: pass --windows FILE.json (a list of token-id lists, e.g. written by omniq) for
identical windows. Without it the script samples nsamples windows with Python's `random` seeded by
--seed, starts uniform in [0, len-seqlen-1] like omniq, but omniq draws them with std::mt19937_64,
so the windows differ (expect ppl differences of that size, not bugs).
The quantized weights are rounded to fp16 (as omniq's export stores them) and the model evaluated in
fp32 by the protocol of make_model_fixtures.perplexity.

usage: gptq_reference.py MODEL_DIR --wbits 4 --group 128 [--act-order] [--static-groups]
         [--calib-text data/text/wikitext2-raw/wiki.valid.raw] [--windows w.json]
         [--nsamples 128] [--seqlen 2048] --text data/text/wikitext2-raw/wiki.test.raw
"""
import argparse
import json
import math
import os
import random
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import perplexity  # noqa: E402


def find_params(x, bits):
    """scale, zero per row of x [rows, n] (omniq's RTN math)."""
    qmax = 2 ** bits - 1
    xmax = x.amax(dim=1, keepdim=True)
    xmin = x.amin(dim=1, keepdim=True)
    scale = ((xmax - xmin) / qmax).clamp(min=1e-5, max=1e4)
    zero = (-xmin / scale).clamp(min=-1e4, max=1e4).round()
    return scale, zero


def quantize(x, scale, zero, bits):
    q = (torch.round(x / scale) + zero).clamp(0, 2 ** bits - 1)
    return (q - zero) * scale


def fasterquant(W, H, bits, groupsize, blocksize=128, percdamp=0.01, actorder=False, static_groups=False):
    """The reference algorithm, step by step. W [out, in] fp32, H [in, in] fp32. Returns Q."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]
    if groupsize <= 0:
        scale, zero = find_params(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups and groupsize > 0:
        groups = [find_params(W[:, i:i + groupsize], bits) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(columns, device=W.device)
    H[idx, idx] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize > 0:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)], bits)
                else:
                    c = i1 + i
                    if actorder:
                        c = perm[c].item()
                    scale, zero = groups[c // groupsize]
            q = quantize(w.unsqueeze(1), scale, zero, bits).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


def site_groups(layer, is_opt):
    if is_opt:
        a = layer.self_attn
        return [[a.q_proj, a.k_proj, a.v_proj], [a.out_proj], [layer.fc1], [layer.fc2]]
    a, m = layer.self_attn, layer.mlp
    return [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]


class Catcher(torch.nn.Module):
    """Stands in for layer 0: records its inputs (and the keyword arguments) and stops the forward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.inps, self.kwargs = [], None

    def forward(self, x, *args, **kwargs):
        self.inps.append(x)
        self.kwargs = kwargs
        raise ValueError("caught")


@torch.no_grad()
def gptq_model(model, windows, args, dev):
    is_opt = hasattr(model.model, "decoder")
    layers = model.model.decoder.layers if is_opt else model.model.layers
    model.to(dev)
    catcher = Catcher(layers[0])
    layers[0] = catcher
    for w in windows:
        try:
            model(torch.tensor(w, device=dev).unsqueeze(0))
        except ValueError:
            pass
    layers[0] = catcher.layer
    inps, kwargs = catcher.inps, catcher.kwargs
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}

    def run(layer, x):
        y = layer(x, **kwargs)
        return y[0] if isinstance(y, tuple) else y

    for li, layer in enumerate(layers):
        for group in site_groups(layer, is_opt):
            state = {"H": None, "n": 0}

            def hook(mod, inp):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                n = x.shape[0]
                if state["H"] is None:
                    state["H"] = torch.zeros(x.shape[1], x.shape[1], device=dev)
                state["H"] *= state["n"] / (state["n"] + n)
                state["n"] += n
                x = math.sqrt(2 / state["n"]) * x
                state["H"] += x.t().matmul(x)

            h = group[0].register_forward_pre_hook(hook)  # the group's Linears share this input
            for x in inps:
                run(layer, x)
            h.remove()
            for mod in group:
                Q = fasterquant(mod.weight.data, state["H"], args.wbits, args.group, args.block_size, args.percdamp,
                                args.act_order, args.static_groups)
                mod.weight.data = Q.half().float().to(mod.weight.dtype)
        inps = [run(layer, x) for x in inps]
        print(f"layer {li} done", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--text", required=True, help="evaluation text (WikiText-2 test)")
    ap.add_argument("--calib-text", default="data/text/wikitext2-raw/wiki.valid.raw")
    ap.add_argument("--windows", default="", help="JSON list of token-id lists (overrides sampling)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--group", type=int, default=0, help="0 = per output channel")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--out", default="", help="write the result as JSON here")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    seqlen = min(args.seqlen, model.config.max_position_embeddings)
    if args.windows:
        windows = json.load(open(args.windows))
    else:
        ids = tok.encode(open(args.calib_text, encoding="utf-8").read()).ids
        rng = random.Random(args.seed)
        starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(args.nsamples)]
        windows = [ids[s:s + seqlen] for s in starts]
    gptq_model(model, windows, args, dev)
    ids = tok.encode(open(args.text, encoding="utf-8").read()).ids
    ppl, _, _ = perplexity(model, ids, seqlen, dev, torch.float32)
    label = f"W{args.wbits}A16" + (f"g{args.group}" if args.group > 0 else "")
    print(f"{os.path.basename(os.path.normpath(args.model))} {label} gptq ppl {ppl:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "setting": label, "ppl": ppl, "seqlen": seqlen, "nsamples": len(windows),
                       "act_order": args.act_order, "static_groups": args.static_groups}, f, indent=1)


if __name__ == "__main__":
    main()
