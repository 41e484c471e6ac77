#!/usr/bin/env python3
"""An independent, straightforward PyTorch OmniQuant (spec/omniquant.md), the block math in
omniquant_block.py. Four modes:

calibrate  block-wise OmniQuant of a HF LLaMA/OPT folder (LWC, LET, per-token activation quantizers
           for W-A, MSE (+aug) loss, torch.optim.AdamW with separate lrs, the fp and quantized
           streams, fuse, propagate), then WikiText-2 test perplexity by spec §7. Prints per block the
           first/last epoch loss, the RTN block MSE and the fused block MSE (both on the quantized
           stream against the fp targets), the time, and at the end `ppl <value>`.
             --windows FILE: the calibration windows `omniq calibrate --dump-windows FILE` wrote
             (identical windows; without it the windows are sampled with Python's random, so they
             differ from omniq's). Weight-only: the fused weights are rounded to fp16 (omniq's export
             stores fp16) and written into the transformers model, whose own forward is evaluated in
             fp32. W-A: the same fp16 weights through this script's block forward with activation
             quantizers (transformers has none); a self-check first compares that forward with
             transformers' on the fp model.
             --dtype bf16: block compute under torch.autocast(bf16), streams bf16, parameters fp32
             (the reference code's autocast, in bf16 like omniq on GPU); fp32: everything fp32.
bench      the per-block training step of the same implementation on random llama2-7b/70b blocks
           (W4A16 g128 LWC; --abits 4 adds LET + aug loss): ms/step, extrapolated s/block and
           minutes per model, peak memory.
gemms      only the 18 GEMMs of that step (7 forward, 4 dX, 7 dW), bf16, sustained for one block's
           128 x 20 steps: the GEMM floor of a PyTorch step, next to bench_step_gemms (omniq's).
gradfix    gradient fixtures on the nano models for tests/test_omniquant_grad_fixture.cpp.

Examples (run from the repository root on the GPU machine):
  python3 tests/reference/omniquant_reference.py calibrate --model M --wbits 3 --lwc --let \
      --epochs 20 --nsamples 128 --seqlen 1024 --windows w.json --dtype bf16
  python3 tests/reference/omniquant_reference.py bench --shape llama2-7b [--abits 4] [--attention eager]
  python3 tests/reference/omniquant_reference.py gemms --shape llama2-7b
  python3 tests/reference/omniquant_reference.py gradfix --out tests/fixtures/omniquant_grads
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import omniquant_block  # noqa: E402
from omniquant_block import (BlockConfig, OmniQuantBlock, StatsRecorder, block_forward,  # noqa: E402
                             hf_block_params, write_hf_block)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# model plumbing (transformers modules for embeddings / head, our block forward in between)

def load_model(path, device):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return model, tok


def decoder_layers(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def embed(model, ids):
    """ids [B, T] (positions 0..T-1) -> block-0 input [B, T, C] fp32."""
    if hasattr(model.model, "decoder"):
        dec = model.model.decoder
        pos = torch.arange(ids.shape[1], device=ids.device) + getattr(dec.embed_positions, "offset", 2)
        return dec.embed_tokens(ids) + dec.embed_positions.weight[pos][None]
    return model.model.embed_tokens(ids)


def head(model, h):
    if hasattr(model.model, "decoder"):
        ln = model.model.decoder.final_layer_norm
        h = ln(h) if ln is not None else h
    else:
        h = model.model.norm(h)
    return model.lm_head(h).float()


@torch.no_grad()
def own_logits(model, cfg, blocks, ids, abits):
    h = embed(model, ids)
    for P in blocks:
        h = block_forward(cfg, P, h, abits)
    return head(model, h)


@torch.no_grad()
def self_check(model, cfg, ids, dev):
    """Our embedding + block forward + head must reproduce transformers' fp32 logits."""
    blocks = [hf_block_params(l, cfg, dev) for l in decoder_layers(model)]
    ref = model(ids).logits.float()
    got = own_logits(model, cfg, blocks, ids, 16)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"self-check: own forward vs transformers logits, max rel err {err:.2e}", flush=True)
    assert err < 1e-3, "the functional block forward does not reproduce transformers: fix before trusting results"


@torch.no_grad()
def perplexity_own(model, cfg, blocks, ids, seqlen, abits, dev):
    n = len(ids) // seqlen
    nll, count = 0.0, 0
    for i in range(n):
        w = torch.tensor(ids[i * seqlen:(i + 1) * seqlen], device=dev)[None]
        logits = own_logits(model, cfg, blocks, w, abits)
        nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------
# calibrate

def autocast(dt, dev):
    return torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=dt == torch.bfloat16)


@torch.no_grad()
def run_over(fn, inps, dt, dev):
    """fn over every sample of inps [N, T, C] -> [N, T, C] in inps' dtype."""
    out = torch.empty_like(inps)
    for j in range(inps.shape[0]):
        with autocast(dt, dev):
            out[j:j + 1] = fn(inps[j:j + 1]).to(inps.dtype)
    return out


@torch.no_grad()
def mean_mse(a, b):
    return sum(F.mse_loss(a[j].float(), b[j].float()).item() for j in range(a.shape[0])) / a.shape[0]


def train_block(blk, q_inps, fp_outs, aug_outs, args, dt, dev, index):
    groups = []
    if blk.lwc_params():
        groups.append({"params": blk.lwc_params(), "lr": args.lwc_lr})
    if blk.let_params():
        groups.append({"params": blk.let_params(), "lr": args.let_lr})
    if not groups or args.epochs == 0:
        return []
    opt = torch.optim.AdamW(groups, weight_decay=args.wd)
    epoch_loss = []
    for epoch in range(args.epochs):
        losses = []
        for j in range(q_inps.shape[0]):
            with autocast(dt, dev):
                y = blk.forward(q_inps[j:j + 1]).float()
                loss = F.mse_loss(y, fp_outs[j:j + 1].float())
                if aug_outs is not None:
                    loss = loss + F.mse_loss(y, aug_outs[j:j + 1].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        mean = torch.stack(losses).mean().item()  # one host sync per epoch
        if not math.isfinite(mean):
            raise RuntimeError(f"block {index} epoch {epoch}: non-finite loss; try --dtype fp32 or lower lrs")
        epoch_loss.append(mean)
    return epoch_loss


def calibrate(args):
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model, tok = load_model(args.model, dev)
    cfg = BlockConfig.from_hf(model.config)
    seqlen = min(args.seqlen, model.config.max_position_embeddings)
    if args.windows:
        windows = json.load(open(args.windows))
    else:
        ids = tok.encode(open(args.calib_text, encoding="utf-8").read()).ids
        rng = random.Random(args.seed)
        windows = [ids[s:s + seqlen] for s in (rng.randint(0, len(ids) - seqlen - 1) for _ in range(args.nsamples))]
    assert all(len(w) == seqlen for w in windows), f"windows must have {seqlen} tokens (--seqlen)"
    windows = windows[:args.nsamples]
    print(f"{os.path.basename(os.path.normpath(args.model))}: {len(windows)} windows x {seqlen}, W{args.wbits}A{args.abits}"
          f" g{args.group_size} lwc={args.lwc} let={args.let} aug={args.aug_loss} epochs={args.epochs}"
          f" lrs {args.lwc_lr}/{args.let_lr} alpha {args.alpha} {args.dtype}{' RTN' if args.rtn else ''}", flush=True)
    self_check(model, cfg, torch.tensor(windows[0][:256], device=dev)[None], dev)
    text_ids = tok.encode(open(args.text, encoding="utf-8").read()).ids
    eval_seqlen = args.eval_seqlen or seqlen
    if args.fp_ppl:
        blocks = [hf_block_params(l, cfg, dev) for l in decoder_layers(model)]
        print(f"fp ppl {perplexity_own(model, cfg, blocks, text_ids, eval_seqlen, 16, dev):.4f}", flush=True)
        del blocks

    with torch.no_grad():
        fp_inps = torch.cat([embed(model, torch.tensor(w, device=dev)[None]) for w in windows]).to(dt)
    q_inps = fp_inps.clone()
    fused_blocks, report = [], []
    t_all = time.time()
    for i, layer in enumerate(decoder_layers(model)):
        t0 = time.time()
        P0 = hf_block_params(layer, cfg, dev)
        rec = StatsRecorder() if args.let and not args.rtn else None
        fp_outs = run_over(lambda x: block_forward(cfg, P0, x, 16, rec), fp_inps, dt, dev)
        rtn = OmniQuantBlock(cfg, P0, args.wbits, args.abits, args.group_size, lwc=False, let=False)
        rtn_fused = rtn.fused()
        rtn_mse = mean_mse(run_over(lambda x: block_forward(cfg, rtn_fused, x, args.abits), q_inps, dt, dev), fp_outs)
        epoch_loss = []
        if args.rtn:
            blk = rtn
        else:
            blk = OmniQuantBlock(cfg, P0, args.wbits, args.abits, args.group_size, args.lwc, args.let,
                                 rec.stats if rec else None, args.alpha)
            aug = run_over(lambda x: block_forward(cfg, P0, x, 16), q_inps, dt, dev) if args.aug_loss else None
            epoch_loss = train_block(blk, q_inps, fp_outs, aug, args, dt, dev, i)
            del aug
        fused = blk.fused()
        q_outs = run_over(lambda x: block_forward(cfg, fused, x, args.abits), q_inps, dt, dev)
        fused_mse = mean_mse(q_outs, fp_outs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.time() - t0
        line = f"block {i}: rtn mse {rtn_mse:.6g} | fused mse {fused_mse:.6g} ({fused_mse / rtn_mse:.3f}x rtn)"
        if epoch_loss:
            line += f" | epoch loss first {epoch_loss[0]:.6g} last {epoch_loss[-1]:.6g}"
        print(line + f" | {secs:.1f} s", flush=True)
        if args.verbose and epoch_loss:
            print("  epoch losses: " + " ".join(f"{v:.6g}" for v in epoch_loss), flush=True)
        if args.verbose:
            for k, v in sorted(blk.params.items()):
                print(f"  {k}: mean {v.mean().item():.5g} min {v.min().item():.5g} max {v.max().item():.5g}")
        report.append({"block": i, "rtn_mse": rtn_mse, "fused_mse": fused_mse, "epoch_loss": epoch_loss, "seconds": secs})
        fused_blocks.append({k: v.half().float() for k, v in fused.items()})  # as omniq's fp16 export
        write_hf_block(layer, cfg, fused, round_f16=True)
        q_inps, fp_inps = q_outs, fp_outs
        del blk, rtn, P0
    calib_s = time.time() - t_all

    if args.abits >= 16:
        from make_model_fixtures import perplexity
        ppl, _, _ = perplexity(model, text_ids, eval_seqlen, dev, torch.float32)
    else:
        ppl = perplexity_own(model, cfg, fused_blocks, text_ids, eval_seqlen, args.abits, dev)
    print(f"calibration {calib_s:.1f} s", flush=True)
    print(f"ppl {ppl:.4f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "ppl": ppl, "blocks": report, "seconds": calib_s}, f, indent=1)


# ---------------------------------------------------------------------------------------------
# bench

SHAPES = {  # C, H, Hkv, D, intermediate, layers
    "llama2-7b": (4096, 32, 32, 128, 11008, 32),
    "llama2-70b": (8192, 64, 8, 128, 28672, 80),
    "tiny": (256, 4, 2, 64, 768, 4),  # smoke test of this script (e.g. --device cpu)
}


def bench(args):
    dev = args.device
    cuda = dev.startswith("cuda")
    omniquant_block.ATTENTION = args.attention

    def sync():
        if cuda:
            torch.cuda.synchronize()
    C, H, Hkv, D, inter, L = SHAPES[args.shape]
    cfg = BlockConfig("llama", C, H, Hkv, D, inter, 1e-5)
    torch.manual_seed(0)
    P0 = {}
    for site, (o, i) in {"q_proj": (H * D, C), "k_proj": (Hkv * D, C), "v_proj": (Hkv * D, C), "o_proj": (C, H * D),
                         "gate_proj": (inter, C), "up_proj": (inter, C), "down_proj": (C, inter)}.items():
        P0[site + ".weight"] = torch.randn(o, i, device=dev) * 0.02
    P0["input_layernorm.weight"] = torch.ones(C, device=dev)
    P0["post_attention_layernorm.weight"] = torch.ones(C, device=dev)
    wa = args.abits < 16
    if args.group_size < 0:
        args.group_size = 0 if wa else 128
    N, T = args.nsamples, args.seqlen
    steps = args.warmup + args.steps
    assert steps <= N
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # The streams a real run holds: q_inps, fp_outs (+ aug targets), bf16 like the reference code.
    q_inps = torch.randn(N, T, C, device=dev, dtype=torch.bfloat16)
    fp_outs = torch.empty_like(q_inps)
    aug = torch.empty_like(q_inps) if wa else None
    rec = StatsRecorder() if wa else None
    run_over(lambda x: block_forward(cfg, P0, x, 16), q_inps[:1], torch.bfloat16, dev)  # warm-up
    sync()
    t0 = time.time()
    fp_outs[:steps] = run_over(lambda x: block_forward(cfg, P0, x, 16, rec), q_inps[:steps], torch.bfloat16, dev)
    sync()
    fwd_ms = (time.time() - t0) / steps * 1e3
    if wa:
        aug[:steps] = fp_outs[:steps]
    blk = OmniQuantBlock(cfg, P0, args.wbits, args.abits, args.group_size, lwc=True, let=wa,
                         stats=rec.stats if rec else None, alpha=0.75 if wa else 0.5)
    groups = [{"params": blk.lwc_params(), "lr": 1e-2}] + ([{"params": blk.let_params(), "lr": 5e-3}] if wa else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    fwd = torch.compile(blk.forward) if args.compile else blk.forward

    def step(j):
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
            y = fwd(q_inps[j:j + 1]).float()
            loss = F.mse_loss(y, fp_outs[j:j + 1].float())
            if aug is not None:
                loss = loss + F.mse_loss(y, aug[j:j + 1].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for j in range(args.warmup):
        step(j)
    sync()
    t0 = time.time()
    for j in range(args.warmup, steps):
        loss = step(j)
    sync()
    ms = (time.time() - t0) / args.steps * 1e3
    assert math.isfinite(loss.item())
    s_block = ms * 1e-3 * N * args.epochs
    # + the no-grad passes of a real run: fp targets, propagation (+ aug targets), N samples each
    s_passes = fwd_ms * 1e-3 * N * (3 if wa else 2)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name() if cuda else dev
    label = f"W{args.wbits}A{args.abits}" + (f"g{args.group_size}" if args.group_size else "") + \
        (" LWC+LET+aug" if wa else " LWC") + (" compiled" if args.compile else "") + f", {args.attention} attention"
    print(f"{args.shape} {label} [1, {T}, {C}] bf16 autocast on {name}: {ms:.1f} ms/step "
          f"(fp block forward {fwd_ms:.1f} ms/sample); {N}x{args.epochs} steps/block -> {s_block:.0f} s/block training "
          f"+ {s_passes:.0f} s no-grad passes; {L} blocks -> {(s_block + s_passes) * L / 60:.1f} min; "
          f"peak memory {mem:.2f} GiB", flush=True)


def bench_gemms(args):
    """The GEMMs autograd runs for one W4A16 LWC step (F.linear forward; dX = dY·W, dW = dYᵀ·X in the
    backward; no dX for q/k/v: their input is data), bf16, timed with CUDA events over --reps steps."""
    C, H, Hkv, D, inter, L = SHAPES[args.shape]
    T, dev, bf = args.seqlen, args.device, torch.bfloat16
    torch.manual_seed(0)

    def act(n):
        return torch.rand(T, n, device=dev, dtype=bf) * 2 - 1

    def wt(n, k):
        return (torch.rand(n, k, device=dev, dtype=bf) - 0.5) * 0.1
    xn1, xn2, attn, h = act(C), act(C), act(H * D), act(inter)
    wq, wk, wv, wo = wt(H * D, C), wt(Hkv * D, C), wt(Hkv * D, C), wt(C, H * D)
    wg, wu, wd = wt(inter, C), wt(inter, C), wt(C, inter)
    d_c, d_f1, d_f2 = act(C) * 1e-3, act(inter) * 1e-3, act(inter) * 1e-3
    d_q, d_kv = act(H * D) * 1e-3, act(Hkv * D) * 1e-3

    def step():
        F.linear(xn1, wq), F.linear(xn1, wk), F.linear(xn1, wv)
        h1 = F.linear(attn, wo)
        F.linear(xn2, wg), F.linear(xn2, wu)
        F.linear(h, wd)
        d_c @ wd, d_c.t() @ h                        # down: dX, dW
        d_f1.t() @ xn2, d_f2.t() @ xn2               # up, gate: dW
        d_f1 @ wu, d_f2 @ wg                         # up, gate: dX (autograd sums them)
        d_c @ wo, d_c.t() @ attn                     # o: dX, dW
        d_q.t() @ xn1, d_kv.t() @ xn1, d_kv.t() @ xn1  # q, k, v: dW
        return h1
    flop = 2.0 * T * (2 * (H * D * C + 2 * Hkv * D * C) + 3 * C * H * D + 9 * C * inter)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    for label, reps in (("burst", 10), ("sustained", args.reps)):
        if label == "burst":
            time.sleep(3)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            step()
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b) / reps
        print(f"torch {torch.__version__} {args.shape} step GEMMs {label} {reps} steps: {ms:.3f} ms/step, "
              f"{flop / ms / 1e9:.1f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------------
# gradfix

GRAD_CASES = {  # model -> [(case, wbits, abits, group, lwc, let, alpha)]
    "llama-nano": [("w3a16", 3, 16, 0, True, True, 0.5), ("w4a4", 4, 4, 0, True, True, 0.75)],
    "opt-nano": [("w3a16", 3, 16, 0, True, True, 0.5), ("w4a4", 4, 4, 0, True, True, 0.75)],
}


def set_deterministic(blk):
    """Non-trivial, deterministic parameter values (k = element index) around the init."""
    init = {}
    with torch.no_grad():
        for name, p in sorted(blk.params.items()):
            k = torch.arange(p.numel(), dtype=torch.float64, device=p.device)
            if name.endswith("lwc_gamma"):
                v = 4.0 + 0.5 * torch.sin(k)
            elif name.endswith("lwc_beta"):
                v = 4.0 + 0.5 * torch.cos(k)
            elif name.endswith("let_scale"):
                init[name] = p.detach().clone()
                v = p.double() * (1.0 + 0.1 * torch.cos(k))
            else:  # let_shift
                init[name] = p.detach().clone()
                v = p.double() + 0.05 * torch.sin(k)
            p.copy_(v.float())
    return init


def grad_fixture(name, cfg, P_block0, P_block1, x0, ids, cases):
    """The tensors and metadata of one model's fixture. x0: embedding output [2, 64, C] (fp32)."""
    with torch.no_grad():  # x: the real input of block 1 (embedding -> fp block 0)
        x = block_forward(cfg, P_block0, x0, 16).float().contiguous()
    rec = StatsRecorder()
    with torch.no_grad():
        target = block_forward(cfg, P_block1, x, 16, rec)
    out = {"ids": ids.to(torch.int32).cpu(), "x": x.cpu(), "target": target.cpu()}
    meta_cases = []
    for case, wbits, abits, group, lwc, let, alpha in cases:
        blk = OmniQuantBlock(cfg, P_block1, wbits, abits, group, lwc, let, rec.stats, alpha)
        init = set_deterministic(blk)
        loss = F.mse_loss(blk.forward(x), target)
        loss.backward()
        with torch.no_grad():
            loss_fused = F.mse_loss(block_forward(cfg, blk.fused(), x, abits), target)
        out[f"{case}.loss"] = loss.detach().view(1).cpu()
        out[f"{case}.loss_fused"] = loss_fused.view(1).cpu()
        for pname, p in sorted(blk.params.items()):
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{case} {pname}: no/bad gradient"
            out[f"{case}.param.{pname}"] = p.detach().cpu().contiguous()
            out[f"{case}.grad.{pname}"] = p.grad.detach().cpu().contiguous()
            if pname in init:
                out[f"{case}.init.{pname}"] = init[pname].cpu().contiguous()
        meta_cases.append({"name": case, "wbits": wbits, "abits": abits, "group": group, "lwc": lwc,
                           "let": let, "alpha": alpha})
        print(f"{name} {case}: loss {loss.item():.8g} fused {loss_fused.item():.8g}, "
              f"{len(blk.params)} parameters: {', '.join(sorted(blk.params))}", flush=True)
    meta = {"model": name, "block": "1", "cases": json.dumps(meta_cases), "torch": torch.__version__}
    return out, meta


def gradfix(args):
    from safetensors.torch import save_file
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    text = open(args.text, encoding="utf-8").read()
    total = 0
    for name, cases in GRAD_CASES.items():
        model, tok = load_model(os.path.join(REPO, "data/models", name), dev)
        cfg = BlockConfig.from_hf(model.config)
        ids = torch.tensor(tok.encode(text).ids[:128], device=dev).view(2, 64)  # BOS + 127 tokens
        self_check(model, cfg, ids, dev)  # our embedding + blocks + head == transformers
        layers = decoder_layers(model)
        with torch.no_grad():
            x0 = embed(model, ids).float()
        out, meta = grad_fixture(name, cfg, hf_block_params(layers[0], cfg, dev), hf_block_params(layers[1], cfg, dev),
                                 x0, ids, cases)
        meta.update({"transformers": __import__("transformers").__version__, "device": dev})
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file(out, path, metadata=meta)
        total += os.path.getsize(path)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")
    print(f"total {total / 1024:.0f} KiB")
    assert total < 1 << 20, "fixtures must stay below 1 MiB"


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--model", required=True)
    c.add_argument("--wbits", type=int, default=4)
    c.add_argument("--abits", type=int, default=16)
    c.add_argument("--group-size", type=int, default=0)
    c.add_argument("--lwc", action="store_true")
    c.add_argument("--let", action="store_true")
    c.add_argument("--aug-loss", action="store_true")
    c.add_argument("--rtn", action="store_true", help="plain RTN (no training), a sanity row")
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--nsamples", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--eval-seqlen", type=int, default=0, help="0: the calibration seqlen")
    c.add_argument("--seed", type=int, default=2)
    c.add_argument("--lwc-lr", type=float, default=1e-2)
    c.add_argument("--let-lr", type=float, default=5e-3)
    c.add_argument("--wd", type=float, default=0.0)
    c.add_argument("--alpha", type=float, default=0.5)
    c.add_argument("--windows", default="", help="JSON token-id windows (omniq calibrate --dump-windows)")
    c.add_argument("--calib-text", default=os.path.join(REPO, "data/text/wikitext2/wiki.valid.tokens"),
                   help="without --windows: omniq's default calibration text")
    c.add_argument("--text", default=os.path.join(REPO, "data/text/wikitext2-raw/wiki.test.raw"))
    c.add_argument("--device", default="cuda")
    c.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    c.add_argument("--out", default="", help="write a JSON report here")
    c.add_argument("--fp-ppl", action="store_true", help="also print the fp model's ppl (own forward)")
    c.add_argument("--verbose", action="store_true", help="all epoch losses and learned-parameter ranges")
    b = sub.add_parser("bench")
    b.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    b.add_argument("--wbits", type=int, default=4)
    b.add_argument("--abits", type=int, default=16)
    b.add_argument("--group-size", type=int, default=-1, help="default: 128 for A16, 0 (per channel) for W-A")
    b.add_argument("--nsamples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=2048)
    b.add_argument("--epochs", type=int, default=20)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--compile", action="store_true")
    b.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="sdpa: F.scaled_dot_product_attention; eager: the reference code's matmul/softmax/matmul")
    b.add_argument("--device", default="cuda")
    m = sub.add_parser("gemms")
    m.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    m.add_argument("--seqlen", type=int, default=2048)
    m.add_argument("--reps", type=int, default=2560)
    m.add_argument("--device", default="cuda")
    g = sub.add_parser("gradfix")
    g.add_argument("--out", default=os.path.join(REPO, "tests/fixtures/omniquant_grads"))
    g.add_argument("--text", default=os.path.join(REPO, "data/text/wikitext2-raw/wiki.test.raw"))
    g.add_argument("--device", default="cpu")
    args = ap.parse_args()
    {"calibrate": calibrate, "bench": bench, "gemms": bench_gemms, "gradfix": gradfix}[args.mode](args)


if __name__ == "__main__":
    main()
