#!/bin/sh
# Issue 10's accuracy benchmarks on the real CIFAR-10, non-IID (Dirichlet alpha 0.1):
# 10 clients, 5 per round, the same model, rounds and seed for every run.
#
#   sh benchmarks/bench_federated_optimizers.sh [algorithms|robustness|dp|all] [ROUNDS]
#
# algorithms:  FedAvg FedAvgM FedProx FedAdagrad FedAdam FedYogi SCAFFOLD FedNova
# robustness:  each of FedAvg FedMedian FedTrimmedAvg Krum MultiKrum without attack and with clients
#              2 and 5 attacking (sign_flip, scale, gaussian), 10 of 10 clients per round
# dp:          DPFedAvg at three noise levels (accuracy against epsilon)
#
# Runs go to runs/bench-optimizers/<set>/<name>; benchmarks/plot_federated_optimizers.py
# draws each set's accuracy curves from their metrics.jsonl. Needs the venv on PATH
# (source .venv/bin/activate).
#
# Sized for a 2-core CPU machine (all of it, 40 rounds: about two hours with other work
# beside it, 2026-12-02): a random 10,000 of CIFAR-10's 50,000 train images
# (TRAIN_SAMPLES; the whole 10,000-image test set is kept), the CIFAR ResNet18 at width 4 (WIDTH; 64 is the standard network), 1 local epoch,
# the 10 clients served by 2 worker processes (WORKERS), a test every 2 rounds. Set
# TRAIN_SAMPLES=50000 WIDTH=64 WORKERS=10 for the full-size experiment on a GPU machine.
# Extra options for every run: EXTRA="--round_timeout 600". SEED (default 0) seeds the
# model's initialisation and the clients' sampling (the split stays seed 0's), e.g.
# SEED=1 OUT=runs/bench-optimizers-seed1 for a second seed of the same experiment; ONLY
# (run names, e.g. "FedAvg SCAFFOLD") runs only those.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SET=${1:-all}
ROUNDS=${2:-40}
SOURCE=${CIFAR10_SOURCE:-$ROOT/../shared/data/cifar10-images.tar.gz}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-10000}
DATA=${CIFAR10_SPLIT:-$ROOT/data/cifar10_dir0.1_10_n$TRAIN_SAMPLES}
OUT=${OUT:-$ROOT/runs/bench-optimizers}
WIDTH=${WIDTH:-4}
WORKERS=${WORKERS:-2}
EXTRA=${EXTRA:-}
SEED=${SEED:-0}
[ -f "$DATA/10/train/data.h5" ] || python3 "$ROOT/scripts/split_dataset.py" --dataset cifar10 --source "$SOURCE" \
    --out "$DATA" --clients 10 --partition dirichlet --alpha 0.1 --seed 0 --train_samples "$TRAIN_SAMPLES" --overwrite

run() {  # run SET NAME PER_ROUND OPTIONS...
    set_name=$1 name=$2 per_round=$3
    shift 3
    [ -f "$OUT/$set_name/$name/summary.json" ] && return 0  # done already
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    # shellcheck disable=SC2086
    sh "$ROOT/fedml_experiments/distributed/fedResNet18/run_fedavg_distributed_pytorch.sh" 10 "$per_round" "$ROUNDS" \
        --data_path "$DATA" --run_dir "$OUT/$set_name/$name" --wandb_mode disabled --seed "$SEED" \
        --model resnet18 --resnet_width "$WIDTH" --epochs 1 --batch_size 64 --lr 0.05 --lr_schedule cosine --wd 5e-4 \
        --worker_processes "$WORKERS" --frequency_of_the_test 2 "$@" $EXTRA
}

if [ "$SET" = algorithms ] || [ "$SET" = all ]; then
    # The adaptive optimizers at eta = 1e-2, tau = 1e-3 (Reddi et al.'s recommended tau; their
    # defaults here, Flower's, take sign-like steps of 0.1 that a small ResNet does not survive).
    for algorithm in FedAvg FedAvgM FedProx SCAFFOLD FedNova; do
        run algorithms "$algorithm" 5 --federated_optimizer "$algorithm"
    done
    for algorithm in FedAdagrad FedAdam FedYogi; do
        run algorithms "$algorithm" 5 --federated_optimizer "$algorithm" --server_lr 0.01 --tau 1e-3
    done
fi
if [ "$SET" = robustness ] || [ "$SET" = all ]; then
    for algorithm in FedAvg FedMedian FedTrimmedAvg Krum MultiKrum; do
        run robustness "$algorithm-none" 10 --federated_optimizer "$algorithm" --trim_ratio 0.2 --krum_f 2
        for attack in sign_flip scale gaussian; do
            run robustness "$algorithm-$attack" 10 --federated_optimizer "$algorithm" --trim_ratio 0.2 --krum_f 2 \
                --attack "$attack" --attackers 2,5
        done
    done
fi
if [ "$SET" = dp ] || [ "$SET" = all ]; then
    # Ten clients, five a round: noise of std z * S / 5 on every coordinate. z = 0.3 already
    # adds a vector of norm ~13 S (45 k numbers) to a mean of norm <= S, so the levels are
    # small (and the epsilon large: client-level DP needs many clients).
    for noise in 0.003 0.01 0.03 0.1; do
        run dp "DPFedAvg-z$noise" 5 --federated_optimizer DPFedAvg --clip_norm 1.0 --noise_multiplier "$noise"
    done
fi
python3 "$ROOT/benchmarks/plot_federated_optimizers.py" "$OUT"
