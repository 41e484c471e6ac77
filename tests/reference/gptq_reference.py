#!/usr/bin/env python3
"""A straightforward PyTorch GPTQ (Frantar et al. 2022, the reference code's `fasterquant` and
`Quantizer`), the reference omniq's `--method gptq` must match in WikiText-2 perplexity within 0.5%
(issue 5). It implements the spec at the top of quant/gptq.h step by step.

Per decoder layer, sequentially (the reference's --true-sequential): the layer inputs of all
calibration windows are captured (the usual Catcher on layer 0, then each quantized layer's outputs
feed the next); inside a layer the Linears are quantized in input groups in forward order (LLaMA
{q,k,v} {o} {gate,up} {down}; OPT {q,k,v} {out} {fc1} {fc2}), each group's H built from inputs
produced by the already-quantized earlier groups, exactly as quant/gptq.cpp.

Defaults = what omniq does:
  * the quantizer is the original GPTQ Quantizer (range forced to contain 0, all-zero rows -> [-1, 1],
    no scale clamp); --omniq-quantizer switches to OmniQuant's / ops/fake_quant.h's (range not forced
    to contain 0, scale clamp [1e-5, 1e4]), which is GptqOptions::range_contains_zero = false;
  * H = H·n/(n+m) + 2/(n+m)·XᵀX with n counted in tokens (GPTQ counts samples: a constant factor);
  * H⁻¹'s Cholesky factor is computed in float64 and rounded to fp32 (omniq factorises on the host in
    double); --hinv-fp32 uses the original's fp32 chol → cholesky_inverse → chol;
  * the quantized weights stay fp32 while calibrating (omniq propagates its f32 weights) and are
    rounded to fp16 once at the end (omniq's export stores fp16); --propagate-fp16 rounds each
    Linear as soon as it is quantized (the original, which runs the model in fp16).
--hinv-fp32 and --propagate-fp16 change numerics only: GPTQ's greedy column loop flips rounding
decisions on tiny perturbations, so the ppl spread between these variants measures the noise floor
of any ppl comparison with omniq.
Calibration windows: pass --windows FILE.json (a list of token-id lists, e.g. written by omniq
calibrate --dump-windows) for identical windows. Without it the script samples nsamples windows with
Python's `random` seeded by --seed, starts uniform in [0, len-seqlen-1] like omniq, but omniq draws
them with std::mt19937_64, so the windows differ (expect ppl differences of that size, not bugs).
The model is evaluated in fp32 by the protocol of make_model_fixtures.perplexity.

usage: gptq_reference.py MODEL_DIR --wbits 4 --group 128 [--sym] [--act-order] [--static-groups]
         [--calib-text data/text/wikitext2-raw/wiki.valid.raw] [--windows w.json]
         [--nsamples 128] [--seqlen 2048] --text data/text/wikitext2-raw/wiki.test.raw
         [--omniq-quantizer] [--hinv-fp32] [--propagate-fp16]
"""
import argparse
import json
import os
import random
import sys

import torch


def find_params(x, bits, sym=False, contain_zero=True):
    """scale, zero, (qlo, qhi) per row of x [rows, n]: quant/gptq.h's quantizer.

    contain_zero (default): the original GPTQ Quantizer.find_params (mse off), except that a symmetric
    range is always mirrored (the original mirrors only a negative xmin, quant/gptq.h (*)). The
    symmetric zero point 2^(N-1) on levels 0..2^N-1 is omniq's signed range -2^(N-1)..2^(N-1)-1.
    contain_zero=False: ops/fake_quant.h (OmniQuant's UniformAffineQuantizer, no LWC)."""
    maxq = 2 ** bits - 1
    xmax = x.amax(dim=1, keepdim=True)
    xmin = x.amin(dim=1, keepdim=True)
    if contain_zero:
        xmax = xmax.clamp(min=0)
        xmin = xmin.clamp(max=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        both0 = (xmin == 0) & (xmax == 0)
        xmin = torch.where(both0, torch.full_like(xmin, -1), xmin)
        xmax = torch.where(both0, torch.full_like(xmax, 1), xmax)
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
        return scale, zero, (0, maxq)
    if sym:
        qhi = 2 ** (bits - 1) - 1
        scale = (torch.maximum(xmax.abs(), xmin.abs()) / qhi).clamp(min=1e-5, max=1e4)
        return scale, torch.zeros_like(scale), (-(2 ** (bits - 1)), qhi)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-5, max=1e4)
    zero = (-xmin / scale).clamp(min=-1e4, max=1e4).round()
    return scale, zero, (0, maxq)


def quantize(x, params):
    scale, zero, (qlo, qhi) = params
    q = (torch.round(x / scale) + zero).clamp(qlo, qhi)
    return (q - zero) * scale


def fasterquant(W, H, bits, groupsize, blocksize=128, percdamp=0.01, actorder=False, static_groups=False,
                sym=False, contain_zero=True, hinv_fp64=True):
    """The reference algorithm, step by step. W [out, in] fp32, H [in, in] fp32. Returns Q."""
    W = W.clone().float()
    H = H.clone()
    columns = W.shape[1]

    def params(x):
        return find_params(x, bits, sym, contain_zero)

    if groupsize <= 0:
        qp = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups and groupsize > 0:
        groups = [params(W[:, i:i + groupsize]) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.sort(torch.diag(H), descending=True, stable=True).indices  # ties keep order, as omniq
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(columns, device=W.device)
    H[idx, idx] += damp
    if hinv_fp64:
        H = H.double()
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True).float()
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
                        qp = params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    c = i1 + i
                    if actorder:
                        c = perm[c].item()
                    qp = groups[c // groupsize]
            q = quantize(w.unsqueeze(1), qp).flatten()
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

    quantized = []
    for li, layer in enumerate(layers):
        for group in site_groups(layer, is_opt):
            state = {"H": None, "n": 0}

            def hook(mod, inp):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                n = x.shape[0]
                if state["H"] is None:
                    state["H"] = torch.zeros(x.shape[1], x.shape[1], device=dev)
                total = state["n"] + n  # as gptq_accumulate_hessian: beta·H + alpha·XᵀX
                state["H"].mul_(state["n"] / total).add_(x.t().matmul(x), alpha=2 / total)
                state["n"] = total

            h = group[0].register_forward_pre_hook(hook)  # the group's Linears share this input
            for x in inps:
                run(layer, x)
            h.remove()
            for mod in group:
                Q = fasterquant(mod.weight.data, state["H"], args.wbits, args.group, args.block_size, args.percdamp,
                                args.act_order, args.static_groups, args.sym, not args.omniq_quantizer,
                                not args.hinv_fp32)
                mod.weight.data = (Q.half().float() if args.propagate_fp16 else Q).to(mod.weight.dtype)
                quantized.append(mod)
        inps = [run(layer, x) for x in inps]
        print(f"layer {li} done", flush=True)
    for mod in quantized:  # the stored (exported) weights are fp16, as omniq's export
        mod.weight.data = mod.weight.data.half().float().to(mod.weight.dtype)


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
    ap.add_argument("--sym", action="store_true", help="symmetric (omniq --sym)")
    ap.add_argument("--omniq-quantizer", action="store_true",
                    help="ops/fake_quant.h's quantizer (GptqOptions::range_contains_zero = false)")
    ap.add_argument("--hinv-fp32", action="store_true", help="factorise H in fp32 like the original (numerics only)")
    ap.add_argument("--propagate-fp16", action="store_true",
                    help="round each quantized Linear to fp16 before it feeds later layers (numerics only)")
    ap.add_argument("--out", default="", help="write the result as JSON here")
    args = ap.parse_args()
    from tokenizers import Tokenizer  # here, so that fasterquant can be imported without them
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_model_fixtures import perplexity
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
                       "act_order": args.act_order, "static_groups": args.static_groups, "sym": args.sym,
                       "omniq_quantizer": args.omniq_quantizer, "hinv_fp32": args.hinv_fp32,
                       "propagate_fp16": args.propagate_fp16}, f, indent=1)


if __name__ == "__main__":
    main()
