#!/bin/sh
# Issue 10's accuracy benchmarks on the real CIFAR-10, non-IID (Dirichlet alpha 0.1):
# 10 clients, 5 per round, the same model, rounds and seed for every run.
#
#   sh benchmarks/bench_federated_optimizers.sh [algorithms|robustness|dp|all] [ROUNDS]
#
# algorithms:  FedAvg FedAvgM FedProx FedAdagrad FedAdam FedYogi SCAFFOLD FedNova
# robustness:  each of FedAvg FedMedian FedTrimmedAvg Krum without attack and with clients
#              2 and 5 attacking (sign_flip, scale, gaussian), 10 of 10 clients per round
# dp:          DPFedAvg at three noise levels (accuracy against epsilon)
#
# Runs go to runs/bench-optimizers/<set>/<name>; benchmarks/plot_federated_optimizers.py
# draws each set's accuracy curves from their metrics.jsonl. Needs the venv on PATH
# (source .venv/bin/activate). The model is the CIFAR ResNet18 at width 16 with 1 local
# epoch, so that a run of 50 rounds fits a few hours on a small CPU machine; set WIDTH=64
# for the standard ResNet18. Extra options for every run: EXTRA="--round_timeout 600".
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SET=${1:-all}
ROUNDS=${2:-50}
SOURCE=${CIFAR10_SOURCE:-$ROOT/../shared/data/cifar10-images.tar.gz}
DATA=${CIFAR10_SPLIT:-$ROOT/data/cifar10_dir0.1_10}
OUT=${OUT:-$ROOT/runs/bench-optimizers}
WIDTH=${WIDTH:-16}
EXTRA=${EXTRA:-}
[ -f "$DATA/10/train/data.h5" ] || python3 "$ROOT/scripts/split_dataset.py" --dataset cifar10 --source "$SOURCE" \
    --out "$DATA" --clients 10 --partition dirichlet --alpha 0.1 --seed 0 --overwrite

run() {  # run SET NAME PER_ROUND OPTIONS...
    set_name=$1 name=$2 per_round=$3
    shift 3
    [ -f "$OUT/$set_name/$name/summary.json" ] && return 0  # done already
    # shellcheck disable=SC2086
    sh "$ROOT/fedml_experiments/distributed/fedResNet18/run_fedavg_distributed_pytorch.sh" 10 "$per_round" "$ROUNDS" \
        --data_path "$DATA" --run_dir "$OUT/$set_name/$name" --wandb_mode disabled --seed 0 \
        --model resnet18 --resnet_width "$WIDTH" --epochs 1 --batch_size 64 --lr 0.05 --lr_schedule cosine --wd 5e-4 \
        "$@" $EXTRA
}

if [ "$SET" = algorithms ] || [ "$SET" = all ]; then
    for algorithm in FedAvg FedAvgM FedProx FedAdagrad FedAdam FedYogi SCAFFOLD FedNova; do
        run algorithms "$algorithm" 5 --federated_optimizer "$algorithm"
    done
fi
if [ "$SET" = robustness ] || [ "$SET" = all ]; then
    for algorithm in FedAvg FedMedian FedTrimmedAvg Krum; do
        run robustness "$algorithm-none" 10 --federated_optimizer "$algorithm" --trim_ratio 0.2 --krum_f 2
        for attack in sign_flip scale gaussian; do
            run robustness "$algorithm-$attack" 10 --federated_optimizer "$algorithm" --trim_ratio 0.2 --krum_f 2 \
                --attack "$attack" --attackers 2,5
        done
    done
fi
if [ "$SET" = dp ] || [ "$SET" = all ]; then
    for noise in 0.3 0.7 1.0; do
        run dp "DPFedAvg-z$noise" 5 --federated_optimizer DPFedAvg --clip_norm 1.0 --noise_multiplier "$noise"
    done
fi
python3 "$ROOT/benchmarks/plot_federated_optimizers.py" "$OUT"
