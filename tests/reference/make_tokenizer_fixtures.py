#!/usr/bin/env python3
"""Reference tokenizations for tests/test_tokenizer.cpp, written by the Hugging Face `tokenizers` package.

Run from the repository root on a machine with `tokenizers` (0.23.x) installed; `transformers` is
optional and only used for an informational cross-check recorded in each fixture:

    python3 tests/reference/make_tokenizer_fixtures.py              # all four tokenizers
    python3 tests/reference/make_tokenizer_fixtures.py --only gpt2  # one of them

It writes tests/fixtures/tokenizer/{llama-nano,opt-nano,llama-small,opt-small,llama2,gpt2}.json
(each < 100 KB; llama-small/opt-small only when ../shared/models/ holds them, else they are skipped):
  - "wikitext": the WHOLE data/text/wikitext2-raw/wiki.test.raw encoded with add_special_tokens=True:
    the id count, FNV-1a 64 of the ids (little-endian int32 bytes, hex), the first 2000 ids, and the
    decode (skip_special_tokens=False) of the first 400 ids;
  - "cases": ~40 tricky strings with their ids (with and without special tokens), tokens, and
    decode(ids) with skip_special_tokens False and True;
  - vocab_size (1 + the largest id, added tokens included) and bos_id (-1 when encode adds nothing
    in front).
The C++ test loads these files and compares id for id; it skips while they are missing.

The tokenizers:
  llama-nano  data/models/llama-nano/tokenizer.json   (Metaspace "first", byte fallback, <s>)
  opt-nano    data/models/opt-nano/tokenizer.json     (GPT-2 byte level, </s> as BOS)
  llama-small, opt-small  ../shared/models/<name>/tokenizer.json (same pipelines, 8192 pieces)
  llama2      tests/fixtures/tokenizers/llama2/tokenizer.json (Prepend+Replace, no pre-tokenizer;
              its vocabulary is Mistral-7B's: "▁" = 28705)
  gpt2        tests/fixtures/tokenizers/gpt2/encoder.json + vocab.bpe, built as GPT-2's tokenizer:
              BPE.from_file + ByteLevel(add_prefix_space=False) pre-tokenizer + ByteLevel decoder +
              "<|endoftext|>" special, no post-processor (no BOS). This mirrors
              omniq::Tokenizer::from_gpt2_files; transformers' GPT2TokenizerFast built from the same
              two files is compared against it (recorded under "cross_check").
"""
import argparse
import json
import os
import shutil
import struct
import sys
import tempfile

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIKI = "data/text/wikitext2-raw/wiki.test.raw"
VALID = "data/text/wikitext2/wiki.valid.tokens"
GPT2_VOCAB = "tests/fixtures/tokenizers/gpt2/encoder.json"
GPT2_MERGES = "tests/fixtures/tokenizers/gpt2/vocab.bpe"
N_FIRST_IDS = 2000
N_DECODE = 400

CASES = [
    "",
    " ",
    "   ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world   again",
    "\n",
    "line one\nline two\n\n third",
    "\ttab\tseparated\t values",
    " \n \n ",
    "<unk>",
    "a <unk> b",
    "<unk> starts the text",
    "the text ends with <unk>",
    "x<unk>y<unk><unk>z",
    " <unk> , the <unk> of <unk> @-@ <unk> ",
    "<s>",
    "<s>hello",
    "hello <s> world </s> bye",
    "<pad> <|endoftext|> <|endoftext|>x",
    "12345 and 3.14159 and 1,000,000 and 2023-11-22",
    "!!! ??? ... --- @-@ , . ; : ( ) [ ] { } \" '",
    "I'm, you're, he's, they've, we'd, she'll, it't, 'S 'LL 'Re",
    "''quoted'' and \"double\"",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
    "\u00fcber Stra\u00dfe Fu\u00dfg\u00e4nger",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u5206\u8bcd \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467 flag \U0001F1FA\U0001F1F8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "e\u0301 combining a\u0308 and \u0915\u094d\u0937",
    "nbsp\u00a0here ideographic\u3000space line\u2028sep",
    "control \x1c\x1d\x1e\x1f chars \x0b\x0c end",
    "windows\r\nnewlines\r\n",
    "\u03a9 \u2248 \u00e7 \u221a \u222b \u2211 \u20ac \u00a3 \u00a5 \u00a9 \U00010348",
    "a" * 300,
    " = Robert Boulter = \n",
]


def fnv1a64(ids):
    h = 0xCBF29CE484222325
    for b in struct.pack("<%di" % len(ids), *ids):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def read_text(rel):
    # Bytes then UTF-8, so no newline translation: the C++ side reads the same bytes.
    with open(os.path.join(ROOT, rel), "rb") as f:
        return f.read().decode("utf-8")


def valid_excerpt():
    """~1.5 KB of WikiText-2 (tokens version) around its first literal <unk>."""
    path = os.path.join(ROOT, VALID)
    if not os.path.exists(path):
        return None
    text = read_text(VALID)
    k = text.find("<unk>")
    return text[max(0, k - 700):k + 800] if k >= 0 else text[:1500]


def gpt2_pair():
    tok = Tokenizer(models.BPE.from_file(os.path.join(ROOT, GPT2_VOCAB), os.path.join(ROOT, GPT2_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return tok


ALL = ["llama-nano", "opt-nano", "llama-small", "opt-small", "llama2", "gpt2"]


def model_folder(name):
    """Repo-relative folder of a zoo model's tokenizer: bundled under data/models, else ../shared/models."""
    for rel in ("data/models/" + name, "../shared/models/" + name):
        if os.path.exists(os.path.join(ROOT, rel, "tokenizer.json")):
            return rel
    return None


def load(name):
    paths = {"llama2": "tests/fixtures/tokenizers/llama2/tokenizer.json"}
    if name in ("llama-nano", "opt-nano", "llama-small", "opt-small"):
        paths[name] = model_folder(name) + "/tokenizer.json"
    if name == "gpt2":
        return gpt2_pair(), {"vocab": GPT2_VOCAB, "merges": GPT2_MERGES}
    return Tokenizer.from_file(os.path.join(ROOT, paths[name])), {"tokenizer_json": paths[name]}


def hf_tokenizer(name):
    """transformers' view of the same tokenizer (informational cross-check only)."""
    from transformers import AutoTokenizer

    if name == "gpt2":
        from transformers import GPT2TokenizerFast

        tmp = tempfile.mkdtemp()
        shutil.copy(os.path.join(ROOT, GPT2_VOCAB), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(ROOT, GPT2_MERGES), os.path.join(tmp, "merges.txt"))
        return GPT2TokenizerFast.from_pretrained(tmp)
    folder = "tests/fixtures/tokenizers/llama2" if name == "llama2" else model_folder(name)
    return AutoTokenizer.from_pretrained(os.path.join(ROOT, folder))


def cross_check(name, texts_and_ids):
    try:
        import transformers

        hf = hf_tokenizer(name)
    except Exception as e:  # transformers missing or unable to load: record why
        return {"available": False, "why": repr(e)[:300]}
    mismatches = []
    for text, ids in texts_and_ids:
        got = hf(text)["input_ids"]
        if got != ids:
            k = next((i for i in range(min(len(got), len(ids))) if got[i] != ids[i]), min(len(got), len(ids)))
            mismatches.append({"text": text[:60], "at": k, "transformers": got[max(0, k - 2):k + 3],
                               "tokenizers": ids[max(0, k - 2):k + 3], "lengths": [len(got), len(ids)]})
    return {"available": True, "transformers_version": transformers.__version__,
            "class": type(hf).__name__, "agrees": not mismatches, "mismatches": mismatches[:5]}


def make(name, out_dir):
    if name not in ("llama2", "gpt2") and model_folder(name) is None:
        print(f"{name:10s} SKIPPED: no tokenizer.json in data/models/{name} nor ../shared/models/{name}")
        return
    tok, source = load(name)
    wiki = read_text(WIKI)
    ids = tok.encode(wiki, add_special_tokens=True).ids
    empty_ids = tok.encode("", add_special_tokens=True).ids
    bos = empty_ids[0] if empty_ids else -1  # what encode puts in front of any text
    cases = list(CASES)
    excerpt = valid_excerpt()
    if excerpt:
        cases.append(excerpt)
    case_out, checked = [], [(wiki, ids)]
    for text in cases:
        enc = tok.encode(text, add_special_tokens=True)
        case_out.append({
            "text": text,
            "ids": enc.ids,
            "ids_no_special": tok.encode(text, add_special_tokens=False).ids,
            "tokens": enc.tokens,
            "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
        })
        checked.append((text, enc.ids))
    fixture = {
        "name": name,
        "generated_by": "tests/reference/make_tokenizer_fixtures.py",
        "tokenizers_version": tokenizers.__version__,
        "source": source,
        # 1 + the largest id of the vocab and the added tokens (what an embedding table needs; equal
        # to get_vocab_size(with_added_tokens=True) when ids are dense, as in all four files).
        "vocab_size": max(tok.get_vocab(with_added_tokens=True).values()) + 1,
        "vocab_size_with_added_tokens": tok.get_vocab_size(with_added_tokens=True),
        "bos_id": bos,
        "wikitext": {
            "path": WIKI,
            "add_special_tokens": True,
            "count": len(ids),
            "fnv1a64": fnv1a64(ids),
            "first_ids": ids[:N_FIRST_IDS],
            "decode_count": N_DECODE,
            "decoded_prefix": tok.decode(ids[:N_DECODE], skip_special_tokens=False),
        },
        "cases": case_out,
        "cross_check": cross_check(name, checked),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    size = os.path.getsize(path)
    cc = fixture["cross_check"]
    print(f"{name:10s} wiki {len(ids):7d} ids fnv {fixture['wikitext']['fnv1a64']}  bos {bos:6d}  "
          f"vocab {fixture['vocab_size']:6d}  {len(case_out)} cases  {size / 1024:.1f} KB  "
          f"transformers agrees: {cc.get('agrees', 'n/a')}  -> {os.path.relpath(path, ROOT)}")
    if size > 100 * 1024:
        print(f"WARNING: {path} is larger than 100 KB", file=sys.stderr)
    if cc.get("available") and not cc.get("agrees"):
        print(f"NOTE: transformers differs from tokenizers for {name}: {cc['mismatches'][:2]}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=ALL, action="append")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tokenizer"))
    args = ap.parse_args()
    print(f"tokenizers {tokenizers.__version__}")
    for name in args.only or ALL:
        make(name, args.out)


if __name__ == "__main__":
    main()
