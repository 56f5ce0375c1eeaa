#!/usr/bin/env bash
# One-shot accelerator check, under 8 minutes on one GPU: the devices JAX sees; the tests that matter on an
# accelerator (pmap == jit == one device, a bfloat16 train step, resume after a kill); the ResNet-50 benchmark at
# 224 px in bfloat16 with the largest batch that fits (eval, phase 1, phase 2 and the input pipeline); the input
# pipeline and host-overhead benchmark (scripts/pipeline_bench.py); the quickstart. Every step has its own time
# limit and log; summary.json gathers them all.
#
#   scripts/device_check.sh [OUT]                      # default OUT: device_check/
#   DEVICE_CHECK_QUICK=1 scripts/device_check.sh OUT   # smoke test on CPU: tiny sizes, the same steps
#
# The exit status is 0 only when every step succeeded.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export TF_CPP_MIN_LOG_LEVEL=3
TESTS="pmap_jit_and_one_device or bfloat16_training_step or resume_after_kill_and_preemption"
if [ "${DEVICE_CHECK_QUICK:-0}" = 1 ]; then
  MODEL=resnet_tiny SIZE=32 BATCHES="16 8" ROUNDS=1 STEPS=1 IMAGES=64 THREADS=1 PIPE_SIZE=64 LIMIT=600
  TEST_LIMIT=1800  # the tests train tiny models in subprocesses: about 10 minutes on 2 shared CPU cores
  QUICKSTART_ARGS=(--config.phases[0].steps=4 --config.phases[1].steps=4)
else
  MODEL=resnet50 SIZE=224 BATCHES="1024 512 256 128 64" ROUNDS=3 STEPS=1 IMAGES=400 THREADS=$(nproc) PIPE_SIZE=224
  LIMIT=240 TEST_LIMIT=360 QUICKSTART_ARGS=()
fi

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to OUT/NAME.log, records its status
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name: $*" >&2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$OUT/steps.txt"
  echo "   exit $rc after $((SECONDS - start)) s" >&2
  return $rc
}

: >"$OUT/steps.txt"
step devices 60 python -c "import jax; print(jax.default_backend(), jax.devices())"
cat "$OUT/devices.log" >&2
step tests "$TEST_LIMIT" python -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_precision.py -k "$TESTS" \
  --junitxml="$OUT/tests.xml"
for batch in $BATCHES; do  # the largest batch that fits: the first that runs
  if step "benchmark_b$batch" "$LIMIT" python scripts/benchmark.py --model "$MODEL" --image-size "$SIZE" \
      --batch-size "$batch" --dtype bfloat16 --rounds "$ROUNDS" --steps "$STEPS" --json "$OUT/benchmark.json"; then
    break
  fi
done
step pipeline "$LIMIT" python scripts/pipeline_bench.py --mode pipeline --images "$IMAGES" --threads "$THREADS" \
  --image-size "$PIPE_SIZE" --epochs 2 --folder "$OUT/photos" --json "$OUT/pipeline.json"
step host "$LIMIT" python scripts/pipeline_bench.py --mode host --rounds 1 --json "$OUT/host.json"
step quickstart "$LIMIT" python -m tljax.main --config=configs/quickstart.py --workdir="$OUT/quickstart" \
  "${QUICKSTART_ARGS[@]}"

python - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
def read(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

steps = {}
for line in open(os.path.join(out, "steps.txt")):
    name, rc, seconds = line.split()
    steps[name] = {"exit": int(rc), "seconds": int(seconds)}
summary = {
    "devices": open(os.path.join(out, "devices.log")).read().strip(),
    "steps": steps,
    "ok": all(s["exit"] == 0 for n, s in steps.items() if not n.startswith("benchmark_"))
          and any(s["exit"] == 0 for n, s in steps.items() if n.startswith("benchmark_")),
    "benchmark_batch": next((int(n[11:]) for n, s in steps.items() if n.startswith("benchmark_b") and s["exit"] == 0),
                            None),
    "benchmark": read("benchmark.json"),
    "pipeline": read("pipeline.json"),
    "host": read("host.json"),
    "quickstart": read("quickstart/summary.json"),
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("devices", "steps", "ok", "benchmark_batch")}, indent=1))
sys.exit(0 if summary["ok"] else 1)
EOF
