#!/usr/bin/env bash
# The accelerator check, as one script for one short device session: GPU correctness (the unit
# tests and a real-data run compared with the CPU's), the two benchmarks, and the triangle-1600
# pipeline end to end at full size. Every step has its own time limit, so that one slow step
# cannot take the others' results with it. Logs and JSON go to $OUT (default ./device_out).
#
#   OUT=out DATA=folder [STEPS='tests e2e_full'] bash experiments/device_check.sh
#
# DATA holds cifar-10-batches-py with at least data_batch_1, test_batch and batches.meta (the
# whole data set is larger than what travels to the device machine). The full-size timing run
# reads data_batch_1 five times over, as batches 1-5: its times are those of 50,000 training
# images, its accuracy is not a result (10,000 distinct images, each five times).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-device_out}
DATA=${DATA:-.devdata}
STEPS=${STEPS:-e2e_slice bench_features bench_kmeans e2e_full tests}  # a subset reruns only those
mkdir -p "$OUT"
# at most a few files come back from a device machine: pack the logs and JSON into one archive
trap 'rm -rf "$OUT/runs"; tar czf device_check.tgz -C "$OUT" . && rm -f "$OUT"/* && mv device_check.tgz "$OUT/"' EXIT

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    echo "=== $name rc=$? $(date +%T)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"

# Real data, 10,000 training images: the same config runs on the CPU for the accuracy comparison.
step e2e_slice 90 python3 -m kmjax.cli run configs/coates2011_triangle_1600.toml --data-dir "$DATA" \
    --set data.train_batches=[1] --set name=gpu_slice --out "$OUT/runs"
cp "$OUT"/runs/gpu_slice/results.json "$OUT/e2e_slice.json" 2>/dev/null

step bench_features 60 sh -c "python3 experiments/bench_features.py --images 16384 --batch-wide-step 256 \
    --json $OUT/bench_features_float32.json && python3 experiments/bench_features.py --images 16384 \
    --batch-wide-step 256 --precision tf32 --json $OUT/bench_features_tf32.json"
step bench_kmeans 120 sh -c "python3 experiments/bench_kmeans.py --libs kmjax,sklearn --problems seed,paper \
    --iters 10 --repeats 3 --json $OUT/bench_kmeans_float32.json && python3 experiments/bench_kmeans.py \
    --libs kmjax --problems seed,paper,scale --iters 10 --repeats 3 --precision tf32 \
    --json $OUT/bench_kmeans_tf32.json && python3 experiments/bench_kmeans.py --libs kmjax,sklearn \
    --problems scale --iters 3 --repeats 1 --json $OUT/bench_kmeans_scale.json"

# Full size: 50,000 training images (data_batch_1 five times), 10,000 test images.
full=$(mktemp -d)/cifar-10-batches-py
mkdir -p "$full"
for i in 1 2 3 4 5; do ln -s "$(realpath "$DATA")/cifar-10-batches-py/data_batch_1" "$full/data_batch_$i"; done
ln -s "$(realpath "$DATA")/cifar-10-batches-py/test_batch" "$full/test_batch"
ln -s "$(realpath "$DATA")/cifar-10-batches-py/batches.meta" "$full/batches.meta"
step e2e_full 100 python3 -m kmjax.cli run configs/coates2011_triangle_1600.toml --data-dir "$(dirname "$full")" \
    --set name=gpu_full_timing --out "$OUT/runs"
cp "$OUT"/runs/gpu_full_timing/results.json "$OUT/e2e_full.json" 2>/dev/null

step tests 100 env -u KMJAX_DATA_DIR python3 -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_cluster.py tests/test_features.py tests/test_classify.py tests/test_encoders.py \
    tests/test_preprocess.py tests/test_patches.py tests/test_pooling.py tests/test_model.py \
    tests/test_properties.py
