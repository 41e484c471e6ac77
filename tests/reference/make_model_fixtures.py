#!/usr/bin/env python3
"""Golden fixtures for the model forward and perplexity tests, computed with transformers.

Runs on the GPU machine (transformers 5.x, tokenizers, torch). For each model folder given:
  - ids of a fixed input (the first 64 tokens of WikiText-2 raw test, BOS included) and the fp32
    CPU next-token logits at 8 positions (every 8th) -> <name>.logits.bin (little-endian f32) + json
  - WikiText-2 raw test perplexity by the protocol of spec/omniquant.md section 7 (whole file,
    tokenised once with BOS, n = len // seqlen windows, mean NLL over all predicted positions):
    fp32 on CPU, and fp32 / bf16 on CUDA when a GPU is present.
Writes <out>/<name>.json and <out>/<name>.logits.bin.

usage: make_model_fixtures.py --text data/text/wikitext2-raw/wiki.test.raw --out tests/fixtures/models \
           MODEL_DIR [MODEL_DIR ...]
"""
import argparse
import json
import math
import os
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def perplexity(model, ids, seqlen, device, dtype):
    model = model.to(device=device, dtype=dtype)
    n = len(ids) // seqlen
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            window = torch.tensor(ids[i * seqlen:(i + 1) * seqlen], device=device).unsqueeze(0)
            logits = model(window).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            total_nll += nll.item()
            total_tokens += seqlen - 1
    return math.exp(total_nll / total_tokens), n, total_tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seqlen", type=int, default=0, help="0: min(2048, max_position_embeddings)")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    text = open(args.text, encoding="utf-8").read()
    torch.manual_seed(0)

    for model_dir in args.models:
        name = os.path.basename(os.path.normpath(model_dir))
        tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        ids = tok.encode(text).ids
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        cfg = model.config
        seqlen = args.seqlen or min(2048, cfg.max_position_embeddings)

        # Next-token logits of a fixed input, fp32 on CPU.
        inp = ids[:64]
        positions = list(range(0, 64, 8))
        with torch.no_grad():
            logits = model(torch.tensor([inp])).logits[0].float()
        sel = logits[positions].contiguous().numpy()
        sel.astype("<f4").tofile(os.path.join(args.out, f"{name}.logits.bin"))

        result = {
            "model": name,
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
            "text": os.path.basename(args.text),
            "num_tokens": len(ids),
            "seqlen": seqlen,
            "input_ids": inp,
            "logit_positions": positions,
            "vocab_size": int(logits.shape[-1]),
            "ppl": {},
        }
        t0 = time.time()
        ppl, n, ntok = perplexity(model, ids, seqlen, "cpu", torch.float32)
        result["ppl"]["cpu_f32"] = ppl
        result["num_windows"] = n
        result["predicted_tokens"] = ntok
        print(f"{name}: {len(ids)} tokens, {n} windows of {seqlen}: ppl cpu f32 {ppl:.6f} ({time.time()-t0:.1f}s)")
        if torch.cuda.is_available():
            for label, dt in (("cuda_f32", torch.float32), ("cuda_bf16", torch.bfloat16), ("cuda_f16", torch.float16)):
                p, _, _ = perplexity(model, ids, seqlen, "cuda", dt)
                result["ppl"][label] = p
                print(f"{name}: ppl {label} {p:.6f}")
            model.to("cpu", torch.float32)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
