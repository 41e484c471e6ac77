#!/usr/bin/env python3
"""Perplexity of a straightforward PyTorch RTN (round-to-nearest) of each zoo model, the reference
omniq's `--method rtn` must match within 0.2% (issue 4).

The quantizer is the OmniQuant reference code's UniformAffineQuantizer without LWC: per output
channel or per group of g input columns, asymmetric min-max (the range need not contain 0),
scale = clamp((max-min)/(2^N-1), 1e-5, 1e4), zp = round(clamp(-min/scale, -1e4, 1e4)),
q = clamp(round(x/scale)+zp, 0, 2^N-1), x_hat = (q-zp)*scale. Every Linear of every decoder layer
is quantized (not embeddings, not lm_head). The quantized weights are rounded to fp16 as omniq's
exported folder stores them, then the model is evaluated in fp32 on the GPU (CPU without one) by
the protocol of spec §7 (make_model_fixtures.perplexity).

usage: make_rtn_fixtures.py --text data/text/wikitext2-raw/wiki.test.raw --out tests/fixtures/rtn MODEL_DIR...
"""
import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_model_fixtures import perplexity  # noqa: E402

SETTINGS = [("W4A16", 4, 0), ("W4A16g128", 4, 128), ("W3A16", 3, 0), ("W3A16g128", 3, 128),
            ("W2A16g128", 2, 128), ("W2A16g64", 2, 64)]


def rtn(w, bits, group):
    out_f, in_f = w.shape
    g = group if group > 0 else in_f
    x = w.reshape(-1, g)
    xmax = x.amax(dim=-1, keepdim=True)
    xmin = x.amin(dim=-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((xmax - xmin) / qmax).clamp(min=1e-5, max=1e4)
    zp = (-xmin / scale).clamp(min=-1e4, max=1e4).round()
    q = (torch.round(x / scale) + zp).clamp(0, qmax)
    return ((q - zp) * scale).reshape(out_f, in_f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    text = open(args.text, encoding="utf-8").read()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for model_dir in args.models:
        name = os.path.basename(os.path.normpath(model_dir))
        ids = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).encode(text).ids
        result = {"model": name, "device": dev, "ppl": {}}
        for label, bits, group in SETTINGS:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            seqlen = min(2048, model.config.max_position_embeddings)
            layers = model.model.layers if hasattr(model.model, "layers") else model.model.decoder.layers
            with torch.no_grad():
                for layer in layers:
                    for mod in layer.modules():
                        if isinstance(mod, torch.nn.Linear):
                            mod.weight.copy_(rtn(mod.weight.float(), bits, group).half().float())
            ppl, _, _ = perplexity(model, ids, seqlen, dev, torch.float32)
            result["ppl"][label] = ppl
            result["seqlen"] = seqlen
            print(f"{name} {label}: rtn ppl {ppl:.4f}", flush=True)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
