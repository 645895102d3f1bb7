#!/bin/sh
# The FineFL setting on the real CIFAR-10: 5 clients, 4 per round, 20 rounds (FineFL
# reports 0.768 test accuracy). Splits ../shared/data/cifar10-images.tar.gz IID over 5
# clients (once), then runs fedResNet18 with the CIFAR ResNet18 at width 16 (a quarter
# of the channels of the standard width 64, so that 20 rounds fit 45 minutes on 2 CPU
# cores), 2 local epochs per round, cosine learning rate.
#
#   sh benchmarks/bench_cifar10_finefl.sh [RUN_DIR]
#
# Needs the project's venv on PATH (source .venv/bin/activate). Prints the final
# accuracy and the wall time; the curve is RUN_DIR/metrics.png.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SOURCE=${CIFAR10_SOURCE:-$ROOT/../shared/data/cifar10-images.tar.gz}
DATA=${CIFAR10_SPLIT:-$ROOT/data/cifar10_iid5}
RUN_DIR=${1:-$ROOT/runs/bench-cifar10-finefl}
[ -f "$DATA/5/train/data.h5" ] || python3 "$ROOT/scripts/split_dataset.py" --dataset cifar10 --source "$SOURCE" \
    --out "$DATA" --clients 5 --partition iid --seed 0 --overwrite
START=$(date +%s)
sh "$ROOT/fedml_experiments/distributed/fedResNet18/run_fedavg_distributed_pytorch.sh" 5 4 20 \
    --data_path "$DATA" --run_dir "$RUN_DIR" --wandb_mode disabled \
    --model resnet18 --resnet_width 16 --epochs 2 --batch_size 64 --lr 0.05 --lr_schedule cosine --wd 5e-4
END=$(date +%s)
python3 - "$RUN_DIR" "$((END - START))" <<'PY'
import json, sys
run_dir, seconds = sys.argv[1], int(sys.argv[2])
summary = json.load(open(f"{run_dir}/summary.json"))
curve = [round(json.loads(l)["test"]["accuracy"], 4) for l in open(f"{run_dir}/metrics.jsonl") if '"test"' in l]
print("accuracy per round:", curve)
print(f"wall_seconds={seconds} final_accuracy={summary['final_test']['accuracy']:.4f}")
PY
