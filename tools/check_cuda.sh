#!/usr/bin/env bash
# Exercise cosy's CUDA paths on a machine with a GPU, in ten minutes or so:
#   1. training speed of the engine on the GPU: fp32, bf16 and fp16 autocast (tools/bench_train.py);
#   2. synthesis speed on the GPU against the CPU (cosy bench): the tiny and v1 sizes, the default model;
#   3. the tiny mini recipe, stages 1-8, every model trained under torchrun on one GPU and
#      embeddings and speech tokens extracted on cuda;
#   4. training speed of the LibriTTS recipe's LM and flow decoder at the published v1 sizes
#      (fp32, bf16, fp16), on the tiny recipe's shards; the tiny LM under DeepSpeed ZeRO 2,
#      stopped and resumed (where deepspeed is installed);
#   5. `cosy serve` on cuda with the recipe's model: one WAV and one streamed request;
#   6. the recipe's speech tokens extracted again on the CPU: the share of tokens that agree.
# Every check runs even when an earlier one failed; the summary at the end lists each one's status.
#
#   tools/check_cuda.sh OUT [CORPUS]
#
# OUT: a new folder for the logs and the recipe's experiment. CORPUS: a tiny corpus made by
# `cosy data corpus --size tiny` elsewhere, copied to OUT/corpus and left as it is (default:
# build one there, which needs espeak-ng). SYNTHESIS_BENCH=0 in the environment skips check 2,
# for a short GPU lease on which it has already run.
set -uo pipefail
[ $# -ge 1 ] || { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 1; }
out=$1
corpus=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary=$out/summary.tsv
: > "$summary"

check() {  # NAME SECONDS COMMAND...: run one check with a time limit, log it, record its status
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name"
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 15 "$out/$name.log"
  printf '%s\t%s\t%ss\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")" "$(( $(date +%s) - start ))" \
    >> "$summary"
}

# share of speech tokens that agree between two copies of the corpus (argv: GPU_DATA CPU_DATA)
cat > "$out/compare_tokens.py" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file

same = total = 0
for part in ("train", "dev", "test"):
    gpu = load_file(str(Path(sys.argv[1]) / part / "utt2speech_token.safetensors"))
    cpu = load_file(str(Path(sys.argv[2]) / part / "utt2speech_token.safetensors"))
    assert gpu.keys() == cpu.keys(), f"{part}: different utterances"
    for utt, tokens in gpu.items():
        assert tokens.shape == cpu[utt].shape, f"{utt}: {tuple(tokens.shape)} vs {tuple(cpu[utt].shape)}"
        same += int((tokens == cpu[utt]).sum())
        total += tokens.numel()
print(f"speech tokens, cuda vs cpu: {same}/{total} agree ({100 * same / total:.2f}%)")
sys.exit(0 if same / total > 0.95 else 1)
EOF

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$out/device.txt"

check bench_train 240 python "$root/tools/bench_train.py" --steps 20
if [ "${SYNTHESIS_BENCH:-1}" != 0 ]; then
  for config in tiny v1; do
    check "bench_${config}_cuda" 240 cosy bench --config "$config" --device cuda --json "$out/bench_${config}_cuda.json"
  done
  check bench_tiny_cpu 240 cosy bench --config tiny --device cpu --json "$out/bench_tiny_cpu.json"
  if [ -d "$root/cosy/assets/default" ]; then
    check bench_default_cuda 240 cosy bench --model-dir "$root/cosy/assets/default" --device cuda \
      --json "$out/bench_default_cuda.json"
    check bench_default_cpu 240 cosy bench --model-dir "$root/cosy/assets/default" --device cpu \
      --json "$out/bench_default_cpu.json"
  fi
fi

# the recipe writes embeddings and speech tokens into its data dirs: work on a fresh copy, so
# that a given corpus is not changed and no tokens of an earlier run can enter the comparison
if [ -n "$corpus" ] && [ ! -d "$corpus" ]; then
  echo "$0: CORPUS $corpus is not a directory" >&2
  exit 1
fi
# physical paths, so that a link to OUT/corpus is caught too
if [ -n "$corpus" ] && [ "$(cd "$corpus" && pwd -P)" = "$(mkdir -p "$out/corpus" && cd "$out/corpus" && pwd -P)" ]; then
  echo "$0: CORPUS $corpus is OUT/corpus, the copy this script makes; keep it elsewhere" >&2
  exit 1
fi
rm -rf "$out/corpus"
if [ -n "$corpus" ]; then
  cp -r "$corpus" "$out/corpus"
else
  check corpus 600 cosy data corpus --size tiny --out "$out/corpus" --seed 0
fi
corpus=$out/corpus
check recipe_tiny_gpu 900 bash "$root/recipes/mini/run.sh" --size tiny --dir "$out/mini" --data "$corpus" \
  --ngpu 1 --stage 1 --stop_stage 8
# the v1 configs with the tiny recipe's text tokenizer and speaker-embedding width; their
# larger speech vocabularies hold the tiny tokenizer's codes
shards=$out/mini/shards/full/train/data.list
if [ -f "$shards" ]; then
  spk_dim=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['model']['campplus']['embedding_dim'])" \
    "$root/recipes/mini/conf/speaker_tiny.yaml")
  check train_llm_v1 300 python "$root/tools/bench_train.py" --steps 20 \
    --config "$root/recipes/libritts/conf/llm_v1.yaml" --train-data "$shards" \
    model.tokenizer="$out/mini/exp/text/tokenizer.json" model.spk_embed_dim="$spk_dim"
  check train_flow_v1 300 python "$root/tools/bench_train.py" --steps 20 \
    --config "$root/recipes/libritts/conf/flow_v1.yaml" --train-data "$shards" model.spk_dim="$spk_dim"
  # DeepSpeed ZeRO 2 with bf16 on the GPU: the tiny LM to step 10, then resumed to step 20
  if python -c "import deepspeed" 2>/dev/null; then
    zero=(--config "$root/recipes/mini/conf/llm_tiny.yaml" --train-data "$shards"
          --cv-data "$out/mini/shards/full/dev/data.list" --out "$out/deepspeed_llm"
          model.tokenizer="$out/mini/exp/text/tokenizer.json" train.deepspeed.zero_stage=2 train.max_epochs=0)
    rm -rf "$out/deepspeed_llm"
    check deepspeed_train 300 torchrun --standalone --nproc_per_node 1 -m cosy.cli train "${zero[@]}" train.max_steps=10
    check deepspeed_resume 300 torchrun --standalone --nproc_per_node 1 -m cosy.cli train "${zero[@]}" \
      train.max_steps=20 --resume
    # a resume without checkpoints would start afresh, with only a warning
    check deepspeed_resumed 30 python -c "import sys
from cosy.train.checkpoint import Checkpoints
log = open(sys.argv[1] + '/train.log').read()
sys.exit(not ('resumed from' in log and 'step 10,' in log and Checkpoints(sys.argv[1]).latest().step == 20))" \
      "$out/deepspeed_llm"
  else
    printf 'deepspeed\tskipped (not installed)\t0s\n' >> "$summary"
  fi
else
  printf 'v1_training_and_deepspeed\tskipped (the recipe wrote no shards)\t0s\n' >> "$summary"
fi

# cosy serve on the GPU: the recipe's model with its test recordings as voices, a WAV and a stream
if [ -d "$out/mini/model" ]; then
  cat > "$out/serve_client.py" <<'EOF'
import json, sys, time, urllib.request

url = sys.argv[1]
for _ in range(120):
    try:
        health = json.load(urllib.request.urlopen(url + "/health", timeout=5))
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("the server did not answer /health within 120 s")
for stream in (False, True):
    body = {"text": "A short test of the server.", "voice": health["voices"][0], "seed": 0, "stream": stream}
    start = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url + "/synthesize", data=json.dumps(body).encode()),
                                timeout=120) as response:
        data = response.read(1)
        first = time.perf_counter() - start
        data += response.read()
    print(f"stream={stream}: {len(data)} bytes, first after {first:.3f} s, all after {time.perf_counter() - start:.3f} s")
    assert len(data) > 1000, "too little audio"
EOF
  cosy serve --model-dir "$out/mini/model" --voices "$corpus/test" --device cuda --port 18765 > "$out/serve.log" 2>&1 &
  server=$!
  check serve_cuda 180 python "$out/serve_client.py" http://127.0.0.1:18765
  kill "$server" 2>/dev/null
fi

if [ -f "$corpus/test/utt2speech_token.safetensors" ]; then
  rm -rf "$out/corpus_cpu"
  cp -r "$corpus" "$out/corpus_cpu"
  for part in train dev test; do
    check "tokens_cpu_$part" 300 cosy extract tokens --data "$out/corpus_cpu/$part" \
      --tokenizer "$out/mini/exp/tokenizer/model.safetensors" --device cpu
  done
  check tokens_agree 60 python "$out/compare_tokens.py" "$corpus" "$out/corpus_cpu"
fi

echo "=== summary"
cat "$summary"
! grep -q FAILED "$summary"
