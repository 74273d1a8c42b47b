#!/usr/bin/env bash
# The whole cosy system on LibriTTS (585 h, 2456 speakers; openslr resource 60), at the
# published CosyVoice v1 sizes, on GPUs. Stages -1 and 0 are LibriTTS's own (download,
# data dirs); stages 1-9 are the mini recipe's, run with this recipe's conf/ and data:
#
#   recipes/libritts/run.sh --db /data/libritts --dir exp/libritts --ngpu 8
#   recipes/libritts/run.sh --dir exp/libritts --ngpu 8 --stage 5 --stop_stage 5   # resume training
#
# -1 download + unpack (resumable)  0 data prep: data/{train,dev,test} + validation
#  1 audio shards, speaker encoder (CAM++ 192-d) + embeddings ... 9 evaluation -> DIR/results.md
# (see recipes/mini/run.sh). Test speakers (test-clean) never occur in train.
set -euo pipefail

stage=-1
stop_stage=9
db=downloads                              # where the archives and LibriTTS/ go
dir=exp/libritts
mirror=https://www.openslr.org/resources/60
train_sets="train-clean-100 train-clean-360 train-other-500"
dev_sets="dev-clean"
test_sets="test-clean"
ngpu=8
nj=16
bpe_size=4000                             # text word pieces: the tokenizer paper's 4k
speaker_model=""                          # a trained speaker model (checkpoint or .onnx): skips its training

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
               echo "options: --stage --stop_stage --db --dir --mirror --train_sets --dev_sets --test_sets" \
                    "--ngpu --nj --bpe_size --speaker_model"; exit 0 ;;
    --*=*) name="${1%%=*}"; value="${1#*=}"; shift ;;
    --*) [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
         name="$1"; value="$2"; shift 2 ;;
    *) echo "$0: unexpected argument '$1' (see --help)" >&2; exit 1 ;;
  esac
  name="${name#--}"; name="${name//-/_}"
  case "$name" in
    stage|stop_stage|db|dir|mirror|train_sets|dev_sets|test_sets|ngpu|nj|bpe_size|speaker_model)
      printf -v "$name" '%s' "$value" ;;
    *) echo "$0: unknown option --$name (see --help)" >&2; exit 1 ;;
  esac
done

recipe=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

if run_stage -1; then
  log "stage -1: download $train_sets $dev_sets $test_sets from $mirror"
  mkdir -p "$db"
  for part in $train_sets $dev_sets $test_sets; do
    if [ -f "$db/LibriTTS/$part/.complete" ]; then continue; fi
    if [ ! -f "$db/$part.tar.gz.done" ]; then
      # -C - continues a partial download where it stopped.
      curl -fL --retry 5 -C - -o "$db/$part.tar.gz" "$mirror/$part.tar.gz"
      touch "$db/$part.tar.gz.done"
    fi
    tar -xzf "$db/$part.tar.gz" -C "$db"
    touch "$db/LibriTTS/$part/.complete"
  done
fi

if run_stage 0; then
  log "stage 0: data dirs"
  for split in train dev test; do
    sets_var=${split}_sets
    subsets=()
    for part in ${!sets_var}; do subsets+=("$db/LibriTTS/$part"); done
    python "$recipe/local/data_prep.py" "${subsets[@]}" "$dir/data/$split"
    cosy data validate "$dir/data/$split"
  done
fi

if [ "$stop_stage" -ge 1 ]; then
  first=$(( stage > 1 ? stage : 1 ))
  "$recipe/../mini/run.sh" --stage "$first" --stop_stage "$stop_stage" --size v1 --conf "$recipe/conf" \
    --data "$dir/data" --dir "$dir" --ngpu "$ngpu" --nj "$nj" --bpe_size "$bpe_size" \
    --speaker_model "$speaker_model" --prompt_warp 0  # the warp was measured on the mini corpus only
fi
