#!/usr/bin/env bash
# The committed allocation-ratio sweep (README "Allocation-ratio sweep"; results in docs/results/allocation_ratio/).
# Every block is one Hydra multirun; each job trains in outputs/sweeps/<sweep>/<its overrides> and resumes from
# its own checkpoints, so re-running this script after an interruption continues where it stopped (a finished
# job only re-evaluates and rewrites its result.json).
#   bash launch/sweep_allocation.sh            # ~9 h on 2 CPU cores (estimated from the runs' times)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
# torch's AVX2 CPU kernels on every x86-64 machine: with AVX-512 ones the sums round differently and a rerun
# elsewhere would not reproduce the committed losses bit for bit.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
# 4k-token BPE, ~0.5M held-out tokens: the validation set every run of the sweep is scored on.
$PY -m data_pipelines.prepare --out data/sweep --vocab-size 4096 --val-fraction 0.06 --val-max-mb 3
train() { $PY -m engram_train.train -m "$@"; }
RHOS=0,0.2,0.4,0.6,0.8,0.9,1.0
for budget in sweep_tiny sweep_tiny_3x; do
  train experiment=$budget scaling.allocation_ratio=$RHOS
done
for budget in sweep_tiny sweep_tiny_3x; do
  # seed spread, at the pure MoE and at an Engram allocation
  train experiment=$budget scaling.allocation_ratio=0.6,1.0 experiment.seed=1235
  # null memory: the Engram block with one row per head, same experts and shared expert as its Engram run
  nulls=0.6; [ $budget = sweep_tiny ] && nulls=0.2,0.6
  train experiment=$budget scaling.allocation_ratio=$nulls engram.null_memory=true scaling.series=null_memory
  # both arms' learning rate, tuned alike (the main runs use 3e-3)
  lrs=6e-3; [ $budget = sweep_tiny ] && lrs=1.5e-3,6e-3,1.2e-2
  train experiment=$budget scaling.allocation_ratio=0.6,1.0 optim.lr=$lrs scaling.series=lr_sweep
done
# the Engram-heavy end at the better learning rate
train experiment=sweep_tiny scaling.allocation_ratio=0,0.2 optim.lr=6e-3 scaling.series=lr_sweep
# infinite memory: the rho=0.6 backbone (10 experts, shared expert 11) fixed, Engram rows swept over 2.4 decades
train experiment=sweep_tiny scaling.allocation_ratio=null model.num_experts=10 model.moe_shared_expert_intermediate_size=11 \
  engram.rows_per_head=32,128,512,2048,8192 scaling.series=infinite_memory
# The tuned sweep: both arms' learning rate from the lr sweep above (6e-3 best for both at tiny and 3x), the whole
# curve with three seeds at tiny and two at 3x, the null-memory control at the same rate; then 1.2e-2 for both arms.
tuned() { train "$@" scaling.series=lr_sweep; }
for budget in sweep_tiny sweep_tiny_3x; do
  tuned experiment=$budget scaling.allocation_ratio=$RHOS optim.lr=6e-3
  seeds=1235; [ $budget = sweep_tiny ] && seeds=1235,1236
  tuned experiment=$budget scaling.allocation_ratio=$RHOS optim.lr=6e-3 experiment.seed=$seeds
done
train experiment=sweep_tiny scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=6e-3 \
  experiment.seed=1234,1235
train experiment=sweep_tiny_3x scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=6e-3
tuned experiment=sweep_tiny scaling.allocation_ratio=$RHOS optim.lr=1.2e-2
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0,0.6,1.0 optim.lr=1.2e-2
# Bracketing the Engram arms' learning rate (best at 1.2e-2, the top of the grid so far): 2.4e-2 for every rho at
# tiny and for rho 0/0.6/1.0 at 3x; the 1.2e-2 curve with more seeds and over the whole range at 3x; the null-memory
# control and the infinite-memory series at 1.2e-2. Two streams, one core each (OMP_NUM_THREADS=1) on 2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
(
  tuned experiment=sweep_tiny scaling.allocation_ratio=$RHOS optim.lr=2.4e-2
  train experiment=sweep_tiny scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=1.2e-2 \
    experiment.seed=1234,1235
  train experiment=sweep_tiny scaling.allocation_ratio=null model.num_experts=10 model.moe_shared_expert_intermediate_size=11 \
    engram.rows_per_head=32,128,512,2048,8192 scaling.series=infinite_memory optim.lr=1.2e-2
  train experiment=sweep_tiny scaling.allocation_ratio=null model.num_experts=10 model.moe_shared_expert_intermediate_size=11 \
    engram.rows_per_head=32,128,512,2048,8192 scaling.series=infinite_memory optim.lr=1.2e-2 experiment.seed=1235
  tuned experiment=sweep_tiny scaling.allocation_ratio=$RHOS optim.lr=1.2e-2 experiment.seed=1235,1236
) &
tiny=$!
(
  tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0.2,0.4,0.8,0.9 optim.lr=1.2e-2
  tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0,0.6,1.0 optim.lr=2.4e-2
  train experiment=sweep_tiny_3x scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=1.2e-2
  tuned experiment=sweep_tiny_3x scaling.allocation_ratio=$RHOS optim.lr=1.2e-2 experiment.seed=1235
) &
wait $tiny && wait $!  # a failed stream fails the script
# Budget tiny_r10: the paper's sparsity (P_tot/P_act 9.9 instead of 3.0), both arms at 6e-3 and 1.2e-2, and the
# null-memory control at an Engram allocation; one learning rate per stream.
(
  tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=$RHOS optim.lr=1.2e-2
  train experiment=sweep_tiny_r10 scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=1.2e-2
) &
r10=$!
tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=$RHOS optim.lr=6e-3
wait $r10
# Seeds and brackets (session 2026-12-03b): tiny_r10 seed 1235 at 1.2e-2 and the whole curve at 2.4e-2; rho 0 above the
# top of its grid at both sparsities (4.8e-2); rho 0/0.2 at 2.4e-2 with a second seed; the tiny_r10 pure MoE's second
# seed at 6e-3 (3x has its second seed at 6e-3 and its 1.2e-2 curve for seed 1235 from the blocks above).
(
  tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=$RHOS optim.lr=1.2e-2 experiment.seed=1235
  tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=0.4,0.6,0.8,0.9 optim.lr=2.4e-2
) &
r10=$!
tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=0,0.2,1.0 optim.lr=2.4e-2
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0 optim.lr=4.8e-2
tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=0 optim.lr=4.8e-2
tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=0,0.2 optim.lr=2.4e-2 experiment.seed=1235
tuned experiment=sweep_tiny_r10 scaling.allocation_ratio=1.0 optim.lr=6e-3 experiment.seed=1235
wait $r10
# A third seed where two disagreed (the 3x MoE at 1.2e-2), and the null-memory control's second seed.
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=1.0 optim.lr=1.2e-2 experiment.seed=1236
for budget in sweep_tiny_3x sweep_tiny_r10; do
  train experiment=$budget scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory optim.lr=1.2e-2 \
    experiment.seed=1235
done
# Budget tiny_r10_3x (session 2026-12-03c): the paper's sparsity at three times the tokens (~36 per parameter), where
# expert capacity has the most room to bind; each arm at its tiny_r10 rate (MoE 6e-3, Engram 1.2e-2). The curve at
# 1.2e-2 dipped below rho 0 (rho 0.2), so next the control for an under-tuned rho 0 (rho 0 and 0.4 at 2.4e-2), then
# second seeds of rho 0, 0.2 and 0.4, then the rest; session 2026-12-03d: rho 0's lower rate bracket (6e-3), third
# seeds of rho 0 and 0.2, rho 0.2 at 6e-3 and the MoE's 1.2e-2 bracket (rho 0.9 dropped for them).
(
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0 optim.lr=6e-3
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.6,0.2 optim.lr=1.2e-2
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.4 optim.lr=2.4e-2
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0 optim.lr=6e-3
  train experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory \
    optim.lr=1.2e-2
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0 optim.lr=1.2e-2 experiment.seed=1236
  tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.2 optim.lr=6e-3
) &
r10_3x=$!
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0 optim.lr=1.2e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.8,0.4 optim.lr=1.2e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0 optim.lr=2.4e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0,0.2,0.4 optim.lr=1.2e-2 experiment.seed=1235
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.2 optim.lr=2.4e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.2 optim.lr=1.2e-2 experiment.seed=1236
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0 optim.lr=1.2e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0 optim.lr=2.4e-2
# session 2026-12-07: second seeds where the curve had one (the MoE at its best rate, rho 0.6 and 0.8)
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0,0.6,0.8 optim.lr=1.2e-2 experiment.seed=1235
# the MoE's second seed at 1.2e-2 came out 0.030 above its first: both of its rates with two seeds
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0 optim.lr=2.4e-2 experiment.seed=1235
# session 2026-12-07b: rho 0, 0.2 (and 0.4) at 2.4e-2 with the second seed the MoE has there (rate brackets on
# equal seeds), and rho 0.6's upper rate bracket
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0,0.2,0.4 optim.lr=2.4e-2 experiment.seed=1235
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.6 optim.lr=2.4e-2
# session 2026-12-07c: rho 0.6's second seed and rho 0.8 at 2.4e-2 (every rho then has 1.2e-2 and 2.4e-2 on two
# seeds each)
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.6 optim.lr=2.4e-2 experiment.seed=1235
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.8 optim.lr=2.4e-2
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.8 optim.lr=2.4e-2 experiment.seed=1235
# and the lower rate bracket of rho 0.4-0.8 (rho 0 and 0.2 had 6e-3 already)
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.4,0.6,0.8 optim.lr=6e-3
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.8 optim.lr=6e-3 experiment.seed=1235
# session 2026-12-07d: the owed seeds (rho 0.4/0.6 at 6e-3, their third at 1.2e-2; 3x rho 0 and the MoE at 2.4e-2),
# and 3x's upper rate bracket for every Engram rho on two seeds
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.4,0.6 optim.lr=6e-3 experiment.seed=1235
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.4,0.6 optim.lr=1.2e-2 experiment.seed=1236
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0,1.0,0.6 optim.lr=2.4e-2 experiment.seed=1235
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0.2,0.4,0.8,0.9 optim.lr=2.4e-2
tuned experiment=sweep_tiny_3x scaling.allocation_ratio=0.2,0.4,0.8,0.9 optim.lr=2.4e-2 experiment.seed=1235
# then every tiny_r10_3x point at 1.2e-2 on three seeds, the null-memory control's second seed, and the MoE, rho 0
# and rho 0.2 at 2.4e-2 on a third seed (both arms' upper brackets on the same seeds)
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.8,1.0 optim.lr=1.2e-2 experiment.seed=1236
train experiment=sweep_tiny_r10_3x scaling.allocation_ratio=0.6 engram.null_memory=true scaling.series=null_memory \
  optim.lr=1.2e-2 experiment.seed=1235
tuned experiment=sweep_tiny_r10_3x scaling.allocation_ratio=1.0,0,0.2 optim.lr=2.4e-2 experiment.seed=1236
wait $r10_3x
$PY -m engram_train.sweep analyze outputs/sweeps/sweep_tiny outputs/sweeps/sweep_tiny_3x outputs/sweeps/sweep_tiny_r10 \
  outputs/sweeps/sweep_tiny_r10_3x --infinite-memory \
  --out docs/results/allocation_ratio
