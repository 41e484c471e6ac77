#!/usr/bin/env bash
# Runs the OmniQuant issue's comparison on one model: FP, then RTN and OmniQuant (reference recipes,
# spec §6) at W3A16, W2A16g128 and W4A4, each calibrated with 128 x seqlen WikiText-2 valid windows,
# evaluated on WikiText-2 test. Prints a markdown table (ppl, calibration time, peak GPU memory) and
# checks that transformers gives the same perplexity on the exported OmniQuant folders when
# CHECK_TRANSFORMERS=1.
#   usage: scripts/omniquant_table.sh MODEL_DIR [OUT_DIR] [extra calibrate flags...]
set -euo pipefail
model=$1; out=${2:-out/table}; shift $(( $# >= 2 ? 2 : 1 ))
omniq=${OMNIQ:-build/omniq}
seqlen=${SEQLEN:-1024}
nsamples=${NSAMPLES:-128}
name=$(basename "$model")
arch=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['model_type'])" "$model/config.json" 2>/dev/null || grep -o '"model_type": *"[a-z]*"' "$model/config.json" | grep -o '[a-z]*"$' | tr -d '"')
mkdir -p "$out"
export OMNIQ_NO_PROGRESS=1

# fp32 evaluation: the numbers the transformers references are computed in
ppl_of() { "$omniq" eval --model "$1" --seqlen "$seqlen" --dtype f32 | awk '/ ppl /{print $3}'; }

# recipes (spec §6)
if [ "$arch" = llama ]; then
  declare -A omni=([W3A16]="--wbits 3 --lwc --epochs 20"
                   [W2A16g128]="--wbits 2 --group-size 128 --lwc --epochs 40 --aug-loss"
                   [W4A4]="--wbits 4 --abits 4 --lwc --let --aug-loss --alpha 0.75 --epochs 20")
else
  declare -A omni=([W3A16]="--wbits 3 --lwc --let --epochs 20"
                   [W2A16g128]="--wbits 2 --group-size 128 --lwc --let --epochs 40"
                   [W4A4]="--wbits 4 --abits 4 --lwc --let --alpha 0.75 --epochs 20")
fi
declare -A rtn=([W3A16]="--wbits 3" [W2A16g128]="--wbits 2 --group-size 128" [W4A4]="--wbits 4 --abits 4")

fp=$(ppl_of "$model")
rows="| $name | FP16 | $fp | | | |\n"
for s in W3A16 W2A16g128 W4A4; do
  rm -rf "$out/$name-rtn-$s" "$out/$name-rtn-$s.state" "$out/$name-omni-$s" "$out/$name-omni-$s.state"
  "$omniq" calibrate --model "$model" --method rtn ${rtn[$s]} --nsamples 8 --seqlen "$seqlen" --out "$out/$name-rtn-$s" "$@" > "$out/$name-rtn-$s.log"
  p_rtn=$(ppl_of "$out/$name-rtn-$s")
  "$omniq" calibrate --model "$model" --method omniquant ${omni[$s]} --nsamples "$nsamples" --seqlen "$seqlen" --out "$out/$name-omni-$s" "$@" > "$out/$name-omni-$s.log"
  done_line=$(grep '^done in' "$out/$name-omni-$s.log")
  t=$(echo "$done_line" | sed -E 's/done in ([^:]*):.*/\1/')
  mem=$(echo "$done_line" | sed -E 's/.*peak memory ([0-9]+) MiB.*/\1/')
  p_omni=$(ppl_of "$out/$name-omni-$s")
  rows+="| $name | $s | $p_rtn | $p_omni | $t | $mem MiB |\n"
  echo "$name $s: RTN $p_rtn  OmniQuant $p_omni  (calibration $t, peak $mem MiB)"
  # transformers cannot run omniq's activation quantizers: only weight-only folders compare 1:1.
  if [ "${CHECK_TRANSFORMERS:-0}" = 1 ] && [ "$s" != W4A4 ]; then
    python3 tests/reference/check_hf_export.py "$out/$name-omni-$s" --ref-ppl "$p_omni" 2>&1 | grep -iE "ppl|error|fail" | tail -2 || true
  fi
done
echo
echo "| model | setting | RTN ppl | OmniQuant ppl | OmniQuant calibration | peak GPU memory |"
echo "|---|---|---|---|---|---|"
printf "$rows"
