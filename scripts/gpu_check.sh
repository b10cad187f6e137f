#!/usr/bin/env bash
# The device check, one script, at most 8 minutes on one H100/H200 (per-step limits add up to 440 s, the probe and
# the summary 20 s each) (scripts/README: run it
# whenever a GPU is lent; record the figures in docs/benchmarks.md with the GPU named):
#   1. the CUDA tests (tests/test_cuda.py, marker `cuda`): the head on CUDA in fp32/bf16/fp16
#      against the fp64 CPU reference, the sparse update, NCCL on one rank, resumed
#      optimizer state; the head's op count per step flat in the number of classes and at
#      most one host sync per step;
#   1b. `python -m fr_trainer.heads.step_count`: aten ops and host syncs (ours and those CUDA
#      reports, set_sync_debug_mode) of one head step at 1M and 10M classes (G 64, D 128),
#      fp32 and bf16; fails if the op count differs between the two or a step syncs twice;
#   2. `fr-trainer bench head --device cuda` at 1M classes per GPU (G 1024, D 512) in bf16
#      (eager and compiled) and fp32 against the GEMM floor of the same dtype, and 10M classes per GPU chunked
#      in bf16 (peak memory: target within 80 GB), also with the fused centre update;
#   3. `fr-trainer bench search --device cuda`: 3,530 probes against 1M x 512 fp32
#      distractors (a 2 GB memmap streamed to the GPU) vs the on-GPU GEMM floor;
#   4. `fr-trainer bench train --device cuda`: the full step (random images on the GPU, so the
#      data path is not in it), iresnet50 in bf16 autocast, channels_last, the head in bf16,
#      batch 256, 100k classes; eager and compiled (target >= 5,000 samples/s on one H200);
#   4b. the same eager step fed by the torch loader from a synthetic train.rec made there
#      (7,200 images, 240 identities), JPEGs decoded on the GPU by torchvision's nvJPEG: the
#      nearest real thing to DALI GPU data, which the device image lacks and cannot carry
#      (the nvidia-dali wheel is 424 MB; a run carries at most 64 MiB);
#   4c. `fr-trainer bench tail --device cuda`: the step's tail (clipping, SGD, the EMA) for
#      iresnet50 in multi-tensor ops against one tensor at a time (ops and ms);
#   5. a JSON and a markdown table of it all in $OUT (default gpu_check_out/).
# Uses the python3 that holds torch (no install: the device image has torch, pytest and
# onnxruntime); the project is imported from this checkout.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
py="${FR_PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - start)) s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$out/steps.jsonl"
  [ "$rc" -eq 0 ] || status=1
}
: > "$out/steps.jsonl"
nvidia-smi -L > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
timeout 20 "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
  >> "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
step cuda_tests 50 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step head_ops 25 "$py" -m fr_trainer.heads.step_count --device cuda --classes 1000000 10000000 \
  --json "$out/step_ops.json"
# --threads: the host threads that draw the centres (a 10M x 512 shard takes ~30 s on one core)
bench=("$py" -m fr_trainer bench head --device cuda --world-size 1 --threads 8 --batch 1024 --dim 512)
# --compiled: also the head with its elementwise passes fused by torch.compile (Triton kernels there)
step head_1m_bf16 60 "${bench[@]}" --classes 1000000 --dtype bf16 --iters 20 --warmup 3 --compiled --json "$out/head_1m_bf16.json"
step head_1m_fp32 20 "${bench[@]}" --classes 1000000 --dtype fp32 --iters 10 --warmup 2 --json "$out/head_1m_fp32.json"
# --fused-update: also the head stepping its centres chunk by chunk in the backward (no whole gradient)
step head_10m_bf16 55 "${bench[@]}" --classes 10000000 --chunk-size 1000000 --dtype bf16 --iters 3 --warmup 1 \
  --fused-update --json "$out/head_10m_bf16.json"
step search_1m 40 "$py" -m fr_trainer bench search --device cuda --quiet --dir /tmp --json "$out/search_1m.json"
train=("$py" -m fr_trainer bench train --device cuda --backbone iresnet50 --batch-size 256 --num-classes 100000
       --precision bf16 --head-dtype bf16 --channels-last on)
step train_r50_bf16 30 "${train[@]}" --steps 30 --warmup 5 --json "$out/train_r50_bf16.json"
step step_tail 10 "$py" -m fr_trainer bench tail --device cuda --backbone iresnet50 --iters 20 \
  --json "$out/step_tail.json"
data="${TMPDIR:-/tmp}/fr_gpu_check_data"
step synth_data 15 "$py" -m fr_trainer synth "$data" --identities 240 --images-per-identity 30 --holdout-identities 10 \
  --pairs 20 --ijbc-subjects 0 --megaface-identities 0 --workers 16 --no-progress
step train_r50_bf16_nvjpeg 40 "${train[@]}" --data "$data" --loader torch --num-workers 6 --data-batches 20 \
  --steps 30 --warmup 5 --json "$out/train_r50_bf16_nvjpeg.json"
# last: a cold inductor + Triton compile of iresnet50 forward and backward takes a minute or more
step train_r50_bf16_compiled 95 "${train[@]}" --compile --steps 30 --warmup 5 --json "$out/train_r50_bf16_compiled.json"
timeout 20 "$py" - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
gpu = (out / "gpu.txt").read_text().strip().replace("\n", "; ")
rows, report = [], {"gpu": gpu, "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]}
for path in sorted(out.glob("head_*.json")):
    data = json.loads(path.read_text())
    results = {r["mode"]: r for r in data["results"]}
    floor, head = results["floor"], results["head"]
    ratio = head["step_ms"] / floor["step_ms"]
    report[path.stem] = {"config": data["config"], "floor_ms": floor["step_ms"], "head_ms": head["step_ms"],
                         "ratio": ratio, "head_peak_mb": head["peak_mb"], "floor_peak_mb": floor["peak_mb"]}
    for mode in ("head", "compiled", "fused"):  # (compiled, fused: with --compiled, --fused-update only)
        if mode not in results:
            continue
        run = results[mode]
        if mode != "head":
            report[path.stem][f"{mode}_ms"] = run["step_ms"]
        rows.append(f"| {path.stem}{'' if mode == 'head' else ' ' + mode} | {floor['step_ms']:.2f} | "
                    f"{run['step_ms']:.2f} | {run['step_ms'] / floor['step_ms']:.2f} | "
                    f"{run['peak_mb'] / 1024:.1f} | {floor['peak_mb'] / 1024:.1f} |")
search = out / "search_1m.json"
if search.is_file():
    rounds = json.loads(search.read_text())["rounds"]
    report["search_1m"] = rounds
    rows.append(f"| search 1M x 512, 3,530 probes | {rounds[0]['floor_before_s'] * 1000:.0f} | "
                f"{rounds[0]['search_s'] * 1000:.0f} | {rounds[0]['ratio']:.2f} | – | – |")
train_rows = []
for path in sorted(out.glob("train_*.json")):
    data = json.loads(path.read_text())
    report[path.stem] = data
    loader = data.get("data_only")  # (the nvJPEG step: the loader alone, before the steps)
    alone = f"{loader['steady_images_per_s']:.0f}" if loader else "–"
    train_rows.append(f"| {path.stem} | {data['samples_per_s']:.0f} | {data['step_ms']:.1f} | {alone} | "
                      + ", ".join(f"{k} {v * 100:.0f}%" for k, v in data["share"].items()) + " |")
if train_rows:
    train_rows = ["", "| full step | samples/s | ms/step | loader alone, images/s | time share |",
                  "|---|---:|---:|---:|---|", *train_rows]
tail = out / "step_tail.json"
if tail.is_file():
    report["step_tail"] = json.loads(tail.read_text())
    train_rows += ["", "| step tail, iresnet50 | ops | ms | one tensor at a time: ops | ms | ratio |",
                   "|---|---:|---:|---:|---:|---:|",
                   *[f"| {r['part']} | {r['ops']} | {r['ms']:.2f} | {r['reference_ops']} | {r['reference_ms']:.2f} | "
                     f"{r['ratio']:.2f} |" for r in report["step_tail"]["results"]]]
ops = out / "step_ops.json"  # (not head_*.json: those are bench results)
ops_rows = []
if ops.is_file():
    report["head_ops"] = json.loads(ops.read_text())
    ops_rows = ["", "| head step | classes | aten ops | host syncs | CUDA-reported syncs |", "|---|---:|---:|---:|---:|",
                *[f"| {r['dtype']} | {r['classes']:,} | {r['ops']} | {r['syncs']} | {r['cuda_reported_syncs']} |"
                  for r in report["head_ops"]["steps"]]]
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
table = [f"GPU: {gpu}", "", "| case | floor ms | head ms | head / floor | head peak GiB | floor peak GiB |",
         "|---|---:|---:|---:|---:|---:|", *rows, *ops_rows, *train_rows, "",
         "| step | exit | seconds |", "|---|---:|---:|",
         *[f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in report["steps"]]]
(out / "gpu_check.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
PY
exit "$status"
