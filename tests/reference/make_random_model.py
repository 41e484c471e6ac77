#!/usr/bin/env python3
"""Writes a Hugging Face folder of a real LLaMA/OPT *shape* with random weights (timing does not
depend on weight values), for throughput and memory measurements of omniq on large shapes.

usage: make_random_model.py --shape llama2-7b --out /tmp/llama2-7b-random [--tokenizer tokenizer.json]
Runs on the GPU machine (weights are initialised on the GPU when one is present, saved as fp16).
"""
import argparse
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

SHAPES = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=32000)),
    "llama2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                             vocab_size=50272, word_embed_proj_dim=4096)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the real count)")
    ap.add_argument("--tokenizer", default="", help="tokenizer.json to copy into the folder")
    args = ap.parse_args()
    arch, kw = SHAPES[args.shape]
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    kw.update(max_position_embeddings=2048, tie_word_embeddings=False)
    cfg = LlamaConfig(**kw, rms_norm_eps=1e-5) if arch == "llama" else OPTConfig(**kw)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = (LlamaForCausalLM if arch == "llama" else OPTForCausalLM)(cfg).half()
    model.save_pretrained(args.out)
    if args.tokenizer:
        shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
