#!/usr/bin/env python3
"""Checks that a Hugging Face folder written by omniq (export_hf_model) loads and evaluates in transformers.

Loads MODEL_DIR with AutoModelForCausalLM (fp32; on CUDA when a GPU is present, else CPU), refuses a
folder whose weights do not cover the model exactly (missing / unexpected / mis-shaped tensors would
otherwise be silently re-initialised), tokenizes with tokenizers.Tokenizer.from_file(tokenizer.json)
and computes WikiText-2 perplexity by the protocol of spec/omniquant.md section 7, using the same
perplexity() as make_model_fixtures.py. Prints `ppl <value>`.

With --ref-ppl X (e.g. what `omniq eval --model MODEL_DIR` printed) exits 1 when
|ppl - X| / X exceeds --rel-tol (default 0.002 = 0.2%, the acceptance bound of issue 4).

usage: check_hf_export.py MODEL_DIR [--ref-ppl X] [--text FILE] [--seqlen N] [--device cpu|cuda]
sanity check of the script itself: export data/models/llama-nano unchanged and compare with
tests/fixtures/models/llama-nano.json's ppl (cpu_f32 / cuda_f32).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from make_model_fixtures import perplexity  # noqa: E402  (one protocol for fixtures and this check)


def load_model(model_dir):
    """fp32 model plus transformers' loading report (None when this version does not give one)."""
    try:
        out = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    except TypeError:  # transformers < 4.56 names the argument torch_dtype
        out = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, output_loading_info=True)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--ref-ppl", type=float, default=None, help="perplexity to agree with (e.g. omniq eval's)")
    ap.add_argument("--rel-tol", type=float, default=0.002, help="allowed relative difference (default 0.2%%)")
    ap.add_argument("--text", default=os.path.join(REPO, "data/text/wikitext2-raw/wiki.test.raw"))
    ap.add_argument("--seqlen", type=int, default=0, help="0: min(2048, max_position_embeddings)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    for f in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(args.model_dir, f)):
            sys.exit(f"{args.model_dir}: no {f}: not a complete model folder")
    if os.path.basename(os.path.normpath(args.model_dir)).endswith(".partial"):
        sys.exit(f"{args.model_dir}: a .partial folder is an unfinished export")

    model, info = load_model(args.model_dir)
    model.eval()
    if info is not None:
        problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            sys.exit(f"{args.model_dir}: transformers did not load the weights cleanly: {problems}")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters, {dtypes})",
          file=sys.stderr)

    tok = Tokenizer.from_file(os.path.join(args.model_dir, "tokenizer.json"))
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read()).ids
    seqlen = args.seqlen or min(2048, model.config.max_position_embeddings)
    t0 = time.time()
    ppl, n, ntok = perplexity(model, ids, seqlen, args.device, torch.float32)
    print(f"{len(ids)} tokens, {n} windows of {seqlen}, {ntok} predicted, {args.device} fp32, {time.time() - t0:.1f}s",
          file=sys.stderr)
    print(f"ppl {ppl:.6f}")

    if args.ref_ppl is not None:
        rel = abs(ppl - args.ref_ppl) / args.ref_ppl
        verdict = "OK" if rel <= args.rel_tol else "MISMATCH"
        print(f"ref {args.ref_ppl:.6f} rel_diff {rel:.6f} tol {args.rel_tol} {verdict}")
        if rel > args.rel_tol:
            sys.exit(1)


if __name__ == "__main__":
    main()
