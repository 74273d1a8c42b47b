#!/usr/bin/env bash
# The whole cosy system on the synthetic mini corpus, from nothing to an evaluated
# zero-shot TTS model. Every stage is one or more `cosy` commands; run a range of them
# with --stage / --stop_stage (each stage reads only what earlier stages wrote under --dir).
#
#   recipes/mini/run.sh --size tiny --dir exp/mini_tiny          # CI: about 5 minutes on 2 cores
#   recipes/mini/run.sh --size default --dir exp/mini            # the real small experiment (1 h 45-55 min)
#   recipes/mini/run.sh --size default --dir exp/mini --stage 5 --stop_stage 5   # resume training
#
# Stages: 0 corpus | 1 audio shards, speaker encoder + embeddings | 2 text BPE + S3 tokenizer |
# 3 speech tokens | 4 shards | 5 train LM, flow, vocoder | 6 average | 7 export + pack |
# 8 zero-shot synthesis of the unseen test speakers | 9 evaluation -> DIR/results.md |
# 10 float16 model dir with its evaluation on examples/voices (what cosy/assets/default ships)
set -euo pipefail

stage=0
stop_stage=10
size=tiny            # tiny | default | wide: the corpus size and the configs CONF/<model>_<size>.yaml
                     # (wide: the test set and hours of default, about twice its training voices; default's configs)
dir=""               # output folder (default exp/mini_<size>)
conf=""              # config folder (default: this recipe's conf/)
data=""              # an existing folder of train/ dev/ test/ data dirs instead of the corpus (start at stage 1)
nj=2                 # parallel jobs for corpus building, shards, feature extraction and the TTS judges
ngpu=0               # > 0: train under torchrun on that many GPUs, extract on cuda
speaker_model=""     # a trained speaker model (checkpoint or .onnx): skips speaker training
seed=0               # corpus seed
average_num=5        # checkpoints averaged (the best by validation loss)
bpe_size=""          # text tokenizer vocabulary (default from --size)
mos=true             # false: skip DNSMOS in stage 9
parallel_train=""    # true: stage 5 trains its three models side by side (default: true on CPU, false with --ngpu)
prompt_warp=4        # synthesis.prompt_warp_semitones of the packed model dirs (0: off); RESULTS.md,
                     # "The output warped toward the prompt's voice"
vocoder_adapt=0      # synthesis.vocoder_adapt_steps of the packed model dirs: the vocoder fitted to each prompt
                     # (0: off; 200 identified 74% of outputs, not 56%, but adds about 30 s per prompt on
                     # 2 CPU cores, 3 h for stage 8); RESULTS.md, "The vocoder fitted to the prompt"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; echo "options: --stage --stop_stage --size --dir --nj --ngpu" \
  "--conf --data --speaker_model --seed --average_num --bpe_size --mos --parallel_train --prompt_warp" \
  "--vocoder_adapt"; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --*=*) name="${1%%=*}"; value="${1#*=}"; shift ;;
    --*) [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
         name="$1"; value="$2"; shift 2 ;;
    *) echo "$0: unexpected argument '$1' (see --help)" >&2; exit 1 ;;
  esac
  name="${name#--}"; name="${name//-/_}"
  case "$name" in
    stage|stop_stage|size|dir|conf|data|nj|ngpu|speaker_model|seed|average_num|bpe_size|mos|parallel_train|prompt_warp|vocoder_adapt) printf -v "$name" '%s' "$value" ;;
    *) echo "$0: unknown option --$name (see --help)" >&2; exit 1 ;;
  esac
done

config_size=$size
case "$size" in
  tiny) : "${bpe_size:=400}" ;;
  default) : "${bpe_size:=500}" ;;
  wide) : "${bpe_size:=500}"; config_size=default ;;
  *) if [ -z "$data" ] || [ -z "$bpe_size" ]; then
       echo "$0: --size must be tiny, default or wide (other config sizes need --data and --bpe_size), got '$size'" >&2
       exit 1
     fi ;;
esac
if [ -n "$data" ] && [ "$stage" -le 0 ]; then
  echo "$0: stage 0 builds the synthetic corpus; with --data start at --stage 1" >&2
  exit 1
fi
if [ -z "$parallel_train" ]; then
  parallel_train=true; [ "$ngpu" -eq 0 ] || parallel_train=false
fi
case "$parallel_train" in
  true|false) ;;
  *) echo "$0: --parallel_train must be true or false, got '$parallel_train'" >&2; exit 1 ;;
esac
if [ "$parallel_train" = true ] && [ "$ngpu" -gt 0 ]; then
  echo "$0: --parallel_train true is for CPU training; with --ngpu each model uses every GPU in turn" >&2
  exit 1
fi
if ! [[ "$prompt_warp" =~ ^[0-9]+([.][0-9]+)?$ ]] ||
   awk -v w="$prompt_warp" 'BEGIN { exit !(w > 12 || (w > 0 && w < 0.2)) }'; then
  echo "$0: --prompt_warp must be 0 (off) or 0.2 to 12 semitones, got '$prompt_warp'" >&2
  exit 1
fi
if ! [[ "$vocoder_adapt" =~ ^[0-9]+$ ]]; then
  echo "$0: --vocoder_adapt must be a number of steps (0: off), got '$vocoder_adapt'" >&2
  exit 1
fi
recipe=$(cd "$(dirname "$0")" && pwd)
conf=$(cd "${conf:-$recipe/conf}" && pwd)
dir=${dir:-exp/mini_$size}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# train/ dev/ test/ Kaldi data dirs; stages 1 and 3 add embeddings and speech tokens to them.
if [ -n "$data" ]; then data=$(cd "$data" && pwd); else data=$dir/corpus; fi
exp=$dir/exp                # one experiment dir per model
device=cpu
if [ "$ngpu" -gt 0 ]; then device=cuda; fi

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# Stage wall times go to DIR/stage_times.tsv, one line per completed stage.
stage_start=0
begin() { log "stage $1: $2"; stage_start=$(date +%s); }
end() { printf '%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - stage_start ))" >> "$dir/stage_times.tsv"; }
run_stage() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

train() {  # train MODEL SHARDS [section.key=value ...]: one experiment, resumed if it was started before
  local model=$1 shards=$dir/shards/$2; shift 2
  local args=(train --config "$conf/${model}_$config_size.yaml" --train-data "$shards/train/data.list"
              --cv-data "$shards/dev/data.list" --out "$exp/$model" --resume "$@")
  if [ "$ngpu" -gt 0 ]; then
    torchrun --standalone --nproc_per_node "$ngpu" -m cosy.cli "${args[@]}"
  else
    cosy "${args[@]}"
  fi
}

average() { cosy average "$exp/$1" --best "$average_num" --out "$exp/$1/model.safetensors"; }

vocab_size() { python -c "import sys; from cosy.text.bpe import TextTokenizer; print(TextTokenizer.load(sys.argv[1]).vocab_size)" "$1"; }

# The speaker model used for embeddings and evaluation: given, or trained in stage 1.
speaker=${speaker_model:-$exp/speaker/model.safetensors}
text_tokenizer=$exp/text/tokenizer.json
mos_flag=()
[ "$mos" = true ] || mos_flag=(--no-mos)
models=(llm flow vocoder)   # what stages 5 and 6 train and average, in stage 5's start order

if run_stage 0; then
  begin 0 "synthetic corpus ($size) and validation"
  cosy data corpus --size "$size" --out "$data" --seed "$seed" --num-jobs "$nj"
  for part in train dev test; do cosy data validate "$data/$part"; done
  end 0 corpus
fi

if run_stage 1; then
  begin 1 "audio shards, speaker encoder and embeddings"
  # Audio + text only: what the speaker encoder and the S3 tokenizer train on.
  for part in train dev; do
    rm -rf "$dir/shards/audio/$part"
    cosy data shards "$data/$part" "$dir/shards/audio/$part" --num-workers "$nj"
  done
  if [ -z "$speaker_model" ]; then
    train speaker audio "model.speakers=$data/train/spk2utt"
    average speaker
  fi
  for part in train dev test; do
    cosy extract embeddings --data "$data/$part" --speaker "$speaker" --num-workers "$nj" --device "$device"
  done
  end 1 speaker
fi

if run_stage 2; then
  begin 2 "text BPE and S3 speech tokenizer"
  cosy text bpe --data "$data/train" --vocab-size "$bpe_size" --out "$text_tokenizer"
  train tokenizer audio "model.text_tokenizer=$text_tokenizer" "model.vocab_size=$(vocab_size "$text_tokenizer")"
  average tokenizer
  end 2 tokenizer
fi

if run_stage 3; then
  begin 3 "speech tokens"
  for part in train dev test; do
    cosy extract tokens --data "$data/$part" --tokenizer "$exp/tokenizer/model.safetensors" \
      --num-workers "$nj" --device "$device"
  done
  end 3 tokens
fi

if run_stage 4; then
  begin 4 "shards with speech tokens and embeddings"
  for part in train dev; do
    rm -rf "$dir/shards/full/$part"
    cosy data shards "$data/$part" "$dir/shards/full/$part" --num-workers "$nj"
  done
  end 4 shards
fi

if run_stage 5; then
  begin 5 "LM, flow decoder, vocoder"
  fit() {  # fit MODEL: one of the three trainings
    if [ "$1" = llm ]; then train llm full "model.tokenizer=$text_tokenizer"; else train "$1" full; fi
  }
  if [ "$parallel_train" = true ]; then
    # A second thread speeds one of these small models up by only 1.5-1.6 x, so on CPU
    # one training per core finishes sooner than three in a row on all cores. With two
    # cores the LM and the flow decoder start, and the vocoder takes the first slot to
    # free up, the LM's; with the LM in bf16, the LM and then the vocoder take about as
    # long as the flow decoder alone (RESULTS.md, "Stage 5 on two cores", "bf16 autocast
    # on the CPU").
    # The cores an even share leaves over (cores % slots: 1 on 4 cores, 2 on 5) go to the LM.
    # Each one's output goes to exp/<model>.log: three progress bars on one terminal
    # would be unreadable.
    cores=$(nproc)
    slots=$cores; [ "$slots" -le ${#models[@]} ] || slots=${#models[@]}
    threads=$(( cores / slots ))
    mkdir -p "$exp"
    # A stopped recipe stops its trainings: each runs as a child of a subshell job.
    stop_trainings() { for p in $(jobs -p); do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
    trap stop_trainings EXIT
    for model in "${models[@]}"; do
      [ "$(jobs -rp | wc -l)" -lt "$slots" ] || wait -n || true
      n=$threads; [ "$model" != "${models[0]}" ] || n=$(( threads + cores % slots ))
      log "training $model in the background ($n thread(s)): $exp/$model.log"
      rm -f "$exp/$model.status"
      # The exit status goes to a file: `wait -n` reaps jobs and their statuses are lost.
      ( if OMP_NUM_THREADS=$n fit "$model" > "$exp/$model.log" 2>&1; then echo 0; else echo 1; fi \
          > "$exp/$model.status" ) &
    done
    wait
    trap - EXIT
    failed=0
    for model in "${models[@]}"; do
      status=$(cat "$exp/$model.status" 2>/dev/null || true)
      rm -f "$exp/$model.status"
      if [ "$status" != 0 ]; then
        echo "$0: training $model failed; the end of $exp/$model.log:" >&2
        tail -n 20 "$exp/$model.log" >&2
        failed=1
      fi
    done
    [ "$failed" -eq 0 ] || exit 1
  else
    for model in "${models[@]}"; do fit "$model"; done
  fi
  end 5 train
fi

if run_stage 6; then
  begin 6 "average the best $average_num checkpoints"
  for model in "${models[@]}"; do average "$model"; done
  end 6 average
fi

if run_stage 7; then
  begin 7 "export and pack"
  cosy export tokenizer "$exp/tokenizer/model.safetensors" --onnx "$exp/tokenizer/tokenizer.onnx"
  speaker_onnx=$speaker
  if [ "${speaker##*.}" != onnx ]; then
    speaker_onnx=$exp/speaker/speaker.onnx
    cosy export speaker "$speaker" --onnx "$speaker_onnx"
  fi
  rm -rf "$dir/model"
  cosy pack --tokenizer "$exp/tokenizer/tokenizer.onnx" --speaker "$speaker_onnx" --llm "$exp/llm" \
    --flow "$exp/flow" --vocoder "$exp/vocoder" --text-tokenizer "$text_tokenizer" --out "$dir/model" \
    --synthesis "prompt_warp_semitones=$prompt_warp" "vocoder_adapt_steps=$vocoder_adapt"
  end 7 pack
fi

if run_stage 8; then
  begin 8 "zero-shot synthesis of the test speakers"
  rm -rf "$dir/synth"
  # manifest.tsv: each test utterance prompted by another one of its speaker; utt2prompt beside the wavs.
  cosy data zeroshot "$data/test" "$dir/synth"
  cosy synthesize --model-dir "$dir/model" --manifest "$dir/synth/manifest.tsv" --out-dir "$dir/synth" \
    --seed "$seed" --device "$device"
  end 8 synthesis
fi

if run_stage 9; then
  begin 9 "evaluation"
  mkdir -p "$dir/eval"
  cosy eval tts --hyp-dir "$dir/synth" --data "$data/test" --speaker "$speaker" "${mos_flag[@]}" --num-jobs "$nj" \
    --out "$dir/eval/tts"
  cosy eval tokenizer --data "$data/test" --tokenizer "$exp/tokenizer/model.safetensors" --out "$dir/eval/tokenizer" \
    --device "$device"
  cosy eval speaker --data "$data/test" --speaker "$speaker" --out "$dir/eval/speaker.json" --device "$device" \
    > "$dir/eval/speaker.txt"
  {
    echo "# cosy mini recipe, size $size"
    echo
    echo "## Zero-shot TTS on the unseen test speakers"
    echo
    cat "$dir/eval/tts.md"
    echo
    echo "## S3 tokenizer on the test set"
    echo
    cat "$dir/eval/tokenizer.md"
    echo
    echo "## Speaker encoder on the test set"
    echo
    echo '```'
    cat "$dir/eval/speaker.txt"
    echo '```'
  } > "$dir/results.md"
  end 9 eval
  log "results: $dir/results.md"
fi

if run_stage 10; then
  begin 10 "ship: half-precision model dir, evaluated on the example voices"
  # What cosy/assets/default is made of (copy DIR/model_half there): the packed system with
  # float16 weights, and its model-card table from the shipped voices in examples/voices.
  voices=$recipe/../../examples/voices
  rm -rf "$dir/model_half" "$dir/voices"
  cosy pack --tokenizer "$dir/model/tokenizer/model.onnx" --speaker "$dir/model/speaker/model.onnx" \
    --llm "$exp/llm" --flow "$exp/flow" --vocoder "$exp/vocoder" --text-tokenizer "$text_tokenizer" \
    --out "$dir/model_half" --half --synthesis "prompt_warp_semitones=$prompt_warp"
  cosy data zeroshot "$voices" "$dir/voices"
  cosy synthesize --model-dir "$dir/model_half" --manifest "$dir/voices/manifest.tsv" --out-dir "$dir/voices" \
    --seed 0 --device "$device"
  cosy eval tts --hyp-dir "$dir/voices" --data "$voices" --speaker "$dir/model_half/speaker/model.onnx" \
    "${mos_flag[@]}" --num-jobs "$nj" --out "$dir/model_half/eval"
  end 10 ship
fi
