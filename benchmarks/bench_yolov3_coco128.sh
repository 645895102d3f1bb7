#!/bin/sh
# yolov3-tiny on coco128, from scratch: trained by one client, and federated (FedAvg) over
# 2 clients with the same total number of optimizer steps; both tested on the 128
# coco128 val2017 images.
#
#   sh benchmarks/bench_yolov3_coco128.sh [OUT_DIR]
#
# Splits ../shared/data/coco128.tar.gz (once) into data/coco128_1client (all 128 train
# images on client 1) and data/coco128_2clients (IID, 64 train images each); the val
# images are each client's test set (all of them for 1 client, half each for 2, whose
# union the server evaluates exactly). Every round each trained client runs EPOCHS local
# epochs of batches of BATCH images, so a round takes ceil(128/BATCH) optimizer steps
# for 1 client and 2 * ceil(64/BATCH) for 2 clients: equal for BATCH dividing 64.
# Settings come from the environment: IMG_SIZE (256), ROUNDS (10), EPOCHS (5),
# BATCH (16), LR (0.001), TEST_EVERY (2).
#
# Needs the project's venv on PATH (source .venv/bin/activate). Prints one line per run
# (rounds, optimizer steps, wall time, final precision / recall / mAP@0.5 /
# mAP@0.5:0.95, AP@0.5 of "person") and the mAP@0.5 curve; the run directories are
# OUT_DIR/central and OUT_DIR/federated.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SOURCE=${COCO128_SOURCE:-$ROOT/../shared/data/coco128.tar.gz}
OUT=${1:-$ROOT/runs/bench-yolov3-coco128}
IMG_SIZE=${IMG_SIZE:-256} ROUNDS=${ROUNDS:-10} EPOCHS=${EPOCHS:-5} BATCH=${BATCH:-16}
LR=${LR:-0.001} TEST_EVERY=${TEST_EVERY:-2}
RUN="$ROOT/fedml_experiments/distributed/fedYOLOv3/run_fedavg_distributed_pytorch.sh"

for clients in 1 2; do
    data="$ROOT/data/coco128_${clients}client$([ "$clients" = 1 ] || echo s)"
    [ -d "$data/$clients/test/images" ] || python3 "$ROOT/scripts/split_dataset.py" --dataset yolo \
        --source "$SOURCE" --out "$data" --clients "$clients" --partition iid --seed 0 --overwrite
done

run() {  # run NAME CLIENTS DATA
    start=$(date +%s)
    sh "$RUN" "$2" "$2" "$ROUNDS" --data_path "$3" --run_dir "$OUT/$1" --wandb_mode disabled \
        --model_def yolov3-tiny.cfg --img_size "$IMG_SIZE" --epochs "$EPOCHS" --batch_size "$BATCH" \
        --optimizer adamw --lr "$LR" --lr_schedule cosine --frequency_of_the_test "$TEST_EVERY" --seed 0
    echo $(($(date +%s) - start)) > "$OUT/$1/bench_wall_seconds"
}
mkdir -p "$OUT"
run central 1 "$ROOT/data/coco128_1client"
run federated 2 "$ROOT/data/coco128_2clients"

python3 - "$OUT" "$ROUNDS" "$EPOCHS" "$BATCH" <<'PY'
import json, math, sys
from pathlib import Path
out, rounds, epochs, batch = Path(sys.argv[1]), *map(int, sys.argv[2:])
for name, shares in (("central", [128]), ("federated", [64, 64])):
    run = out / name
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    test = records[-1]["test"]
    steps = rounds * epochs * sum(math.ceil(n / batch) for n in shares)
    wall = int((run / "bench_wall_seconds").read_text())
    curve = [(r["round"] + 1, round(r["test"]["mAP50"], 4)) for r in records if "test" in r]
    print(f"{name}: clients={len(shares)} rounds={rounds} optimizer_steps={steps} wall_seconds={wall} "
          f"precision={test['precision']:.4f} recall={test['recall']:.4f} mAP50={test['mAP50']:.4f} "
          f"mAP50_95={test['mAP50_95']:.4f} person_AP50={test['AP50_per_class'].get('0', float('nan')):.4f} "
          f"test_images={test['sample_number']} objects={test['num_ground_truth']}")
    print(f"{name}: mAP50 by round {curve}")
PY
