#!/usr/bin/env bash
# Every GPU measurement of the accelerator issues, as one script for one short device session, in
# the order of what matters most: the compile cache and counts (cold and warm end-to-end runs of the
# paper's config; results.json counts the programs compiled), the classifier's device path pass by
# pass at full size (experiments/bench_ridge_device.py), the K = 8000 flip-closed config end to end
# at full size, k-means against the plain PyTorch loop (float32 and TF32), the GEMM autotuning
# policy (cold and warm start and k-means speed with XLA's autotuning off), feature extraction per
# precision, GPU correctness (unit tests, the same seed twice gives the same bytes), the fused
# Pallas kernel, time against K. (Until 2026-12-08, measured on an H200: 8 min 20 s for the steps
# then in it, less the best config's 4 minutes; the new steps have not run on a device yet.) Every
# step has its own time limit, so that one slow step cannot take the others' results with it. Logs
# and JSON go to $OUT (default ./device_out), packed into one archive.
#
#   OUT=out DATA=folder [STEPS='tests determinism'] [DEADLINE=520] bash experiments/device_check.sh
#   DRY=1 OUT=/tmp/dry DATA=../shared/data bash experiments/device_check.sh   # every step, tiny, on a CPU
#
# DATA holds cifar-10-batches-py with at least data_batch_1, test_batch and batches.meta (the
# whole data set is larger than what travels to a device machine; without test_batch, data_batch_1
# stands in for it). Full-size timing runs read data_batch_1 five times over, as batches 1-5: their
# times are those of 50,000 training images, their accuracy is not a result (10,000 distinct
# images, each five times). DEADLINE (seconds, 0 = none) bounds the whole script: each step's limit
# is cut to what is left, less time to pack the archive, and a step is skipped when too little is
# left, so that a device call's own limit never kills the script before it packs its results.
# The steps run in the order of what matters most: the timings of the accelerator issue first.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-device_out}
DATA=${DATA:-.devdata}
DRY=${DRY:-0}
DEADLINE=${DEADLINE:-0}
STEPS=${STEPS:-device e2e_cold e2e_warm ridge_device best_config bench_kmeans autotune bench_features tests determinism bench_pallas bench_kmeans_k}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
# at most a few files come back from a device machine: pack the logs and JSON into one archive
trap 'rm -rf "$OUT/runs" "$OUT"/jit*; tar czf "$OUT/../device_check.tgz" -C "$OUT" . && rm -rf "$OUT"/* && mv "$OUT/../device_check.tgz" "$OUT/"' EXIT

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    if [ "$DEADLINE" -gt 0 ]; then
        local left=$((DEADLINE - (SECONDS - START) - 15))  # 15 s to pack the archive
        if [ "$left" -lt 20 ]; then echo "=== $name skipped: ${left}s left of DEADLINE=$DEADLINE"; return 0; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout "$limit" bash -c '"$@"' _ "$@" > >(tee "$OUT/$name.log") 2>&1  # bash: steps may be functions
    echo "=== $name rc=$? $(date +%T)"
}

# Full size: 50,000 training images (data_batch_1 five times), 10,000 test images.
full=$(mktemp -d)
mkdir -p "$full/cifar-10-batches-py"
for i in 1 2 3 4 5; do ln -s "$(realpath "$DATA")/cifar-10-batches-py/data_batch_1" "$full/cifar-10-batches-py/data_batch_$i"; done
ln -s "$(realpath "$DATA")/cifar-10-batches-py/batches.meta" "$full/cifar-10-batches-py/batches.meta"
if [ ! -e "$DATA/cifar-10-batches-py/test_batch" ]; then  # timings only: data_batch_1 as the test set
    ln -s data_batch_1 "$DATA/cifar-10-batches-py/test_batch"
fi
ln -s "$(realpath "$DATA")/cifar-10-batches-py/test_batch" "$full/cifar-10-batches-py/test_batch"

if [ "$DRY" = 1 ]; then  # the same steps at toy sizes, to check the script itself on a CPU
    SMALL="--set data.n_train=2000 --set data.n_test=500 --set kmeans.k=64 --set patches.num=20000 --set kmeans.max_iter=5 --set classifier.max_iter=50"
    KM="--n-frac 0.01 --iters 2 --repeats 1"; KS="--ks 64,256 --kn 5000"; FEAT="--images 64 --k 64 --repeats 1"
    RIDGE="--rows 2000 --dual-features 3000 --gram-features 500"
else
    SMALL=""; RIDGE=""; KM="--iters 10 --repeats 3"; KS="--ks 64,256,1024,4096 --kn 1000000 --kd 128"; FEAT="--images 16384"
fi
run() {  # run CONFIG NAME [args...]: kmjax run on the full-size timing data
    local config=$1 name=$2
    shift 2
    python3 -m kmjax.cli run "$config" --data-dir "$full" --set name="$name" --out "$OUT/runs" $SMALL "$@" &&
        cp "$OUT/runs/$name/results.json" "$OUT/$name.json"
}

export OUT DATA SMALL full KM
export -f run

step device 30 sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
    python3 -m kmjax.cli info --data-dir $DATA; python3 -c 'import torch; print(\"torch\", torch.__version__)'"

# GPU correctness: the same config twice gives byte-identical files (order-dependent GPU sums
# would differ)
determinism() {
    for i in 1 2; do
        python3 -m kmjax.cli run quick --data-dir "$DATA" --set name="twice_$i" --out "$OUT/runs" -q $SMALL || return 1
    done
    cmp "$OUT/runs/twice_1/model.npz" "$OUT/runs/twice_2/model.npz" && echo "model.npz: identical bytes"
    cmp "$OUT/runs/twice_1/dictionary.npz" "$OUT/runs/twice_2/dictionary.npz" && echo "dictionary.npz: identical bytes"
}
export -f determinism
step determinism 120 determinism

# The compile cache: the paper's config from an empty cache, then again with it warm
export KMJAX_COMPILE_CACHE="$OUT/jit"
step e2e_cold 150 run coates2011_triangle_1600 e2e_cold
step e2e_warm 100 run coates2011_triangle_1600 e2e_warm

# The classifier's device path at full size: 50,000 rows, Gram at 6,401 features, dual at 72,000
step ridge_device 150 python3 experiments/bench_ridge_device.py --json "$OUT/bench_ridge_device.json" $RIDGE

# The best config of the CPU machine (85% on CIFAR-10) end to end at full size, every stage on the
# GPU: its time does not depend on the pixels (its accuracy is measured on CPUs)
step best_config 300 run omp1_soft_8000_closed_pool3_flip best_config

# k-means: one Lloyd iteration against the plain PyTorch loop, float32 and TF32, and against K
step bench_kmeans 200 sh -c "python3 -m kmjax.cli bench kmeans --libs kmjax,torch --problems paper,scale $KM \
    --json $OUT/bench_kmeans_float32.json && python3 -m kmjax.cli bench kmeans --libs kmjax,torch \
    --problems paper,scale $KM --precision tf32 --json $OUT/bench_kmeans_tf32.json"
# XLA's GEMM autotuning off (level 0) against its default: cold and warm start of the paper's config
# from a cache of their own, and the k-means iteration (steady-state speed)
autotune() {
    XLA_FLAGS="--xla_gpu_autotune_level=0" KMJAX_COMPILE_CACHE="$OUT/jit_noautotune" \
        bash -c 'run coates2011_triangle_1600 e2e_cold_noautotune && run coates2011_triangle_1600 e2e_warm_noautotune' &&
    XLA_FLAGS="--xla_gpu_autotune_level=0" python3 -m kmjax.cli bench kmeans --libs kmjax --problems paper $KM \
        --json "$OUT/bench_kmeans_noautotune.json"
}
export -f autotune
step autotune 200 autotune

# the fused Pallas nearest-centroid kernel against the plain path, float32 and TF32 (the paper's problem)
step bench_pallas 120 sh -c "for p in float32 tf32; do python3 -m kmjax.cli bench kmeans --libs kmjax,torch \
    --problems paper $KM --kernel pallas --precision \$p --json $OUT/bench_pallas_\$p.json || exit 1; done"

# Dense features per precision
step bench_features 90 sh -c "for p in float32 tf32 bfloat16; do python3 -m kmjax.cli bench features $FEAT \
    --batch-wide-step 256 --precision \$p --json $OUT/bench_features_\$p.json || exit 1; done"

step bench_kmeans_k 120 python3 -m kmjax.cli bench kmeans --libs kmjax,torch --problems '' $KS $KM \
    --json "$OUT/bench_kmeans_k.json"

# GPU correctness: the unit tests (the scikit-learn estimator checks among them), and the lowering
# for every platform by the device's own JAX
step tests 150 env -u KMJAX_DATA_DIR python3 -m pytest -q -x -n 4 -p no:cacheprovider --durations=5 -m "not data" \
    tests/test_lowering.py tests/test_device.py tests/test_cluster.py tests/test_features.py tests/test_classify.py tests/test_encoders.py \
    tests/test_preprocess.py tests/test_sklearn.py tests/test_select.py tests/test_jit.py tests/test_model.py
