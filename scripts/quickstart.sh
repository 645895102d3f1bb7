#!/usr/bin/env bash
# Quickstart: set up the environment and run a real federated training over MPI, offline.
#
# Data: scikit-learn's bundled "digits" dataset (1,797 8x8 handwritten digits, shipped
# inside the scikit-learn package, so nothing is downloaded), split IID over 4 clients.
# Job:  fedResNet18 (the CIFAR-style ResNet18, width 64, adapted to 1-channel 8x8 input),
#       4 clients, all 4 per round, 10 rounds, 2 local epochs: 1 server + 4 client processes.
# Prints the test accuracy of every round and where the run directory is.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
export PATH="$ROOT/.venv/bin:$PATH"

DATA=$ROOT/data/digits_4clients
RUN_DIR=${RUN_DIR:-$ROOT/runs/quickstart-$(date +%Y%m%d-%H%M%S)}
[ -f "$DATA/4/train/data.h5" ] || python "$ROOT/scripts/split_dataset.py" --dataset digits \
    --out "$DATA" --clients 4 --partition iid --seed 0 --overwrite

sh "$ROOT/fedml_experiments/distributed/fedResNet18/run_fedavg_distributed_pytorch.sh" 4 4 10 \
    --dataset digits --data_path "$DATA" --run_dir "$RUN_DIR" --epochs 2 --batch_size 32 "$@"

python - "$RUN_DIR" <<'PY'
import json, sys
run_dir = sys.argv[1]
records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
print("\ntest accuracy per round:", " ".join(f"{r['test']['accuracy']:.3f}" for r in records if "test" in r))
print(f"final global test accuracy: {records[-1]['test']['accuracy']:.4f}")
print(f"run directory: {run_dir} (server.log, metrics.jsonl, summary.json, metrics.png, final_model.pt)")
PY
