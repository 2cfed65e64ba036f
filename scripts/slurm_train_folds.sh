#!/usr/bin/env bash
# SLURM array job: one task per (dataset, fold), each running the stock nnU-Net commands with a HyM-UNet trainer.
#
#   sbatch --array=0-14 scripts/slurm_train_folds.sh            # 3 datasets x 5 folds (see DATASETS below)
#   DATASETS="501:2d" TRAINER=nnUNetTrainerHyMUNet_noMGF sbatch --array=0-4 scripts/slurm_train_folds.sh
#
# Task i trains fold (i mod 5) of dataset (i div 5) and exports the validation probabilities (--npz), so that
# `nnUNetv2_find_best_configuration` (run once all folds are done, see the end of this file) can compare and ensemble.
# A re-queued or time-limited task resumes from its latest checkpoint (--c). Multi-GPU nodes: set NUM_GPUS>1 to use
# nnU-Net's own DDP (-num_gpus); the HyM-UNet trainers need nothing special for it.
#
# Site-specific lines (partition, account, modules, environment activation) are marked SITE: edit them.
#SBATCH --job-name=hymunet-folds
#SBATCH --gres=gpu:1                 # SITE: one GPU per task (match NUM_GPUS)
#SBATCH --cpus-per-task=12           # data augmentation workers (nnUNet_n_proc_DA) + main process
#SBATCH --mem=64G
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x_%A_%a.out
set -euo pipefail

# dataset id : configuration, one entry per dataset (ISIC 2018, DRIVE, BraTS by default)
DATASETS=${DATASETS:-"501:2d 502:2d 503:3d_fullres"}
TRAINER=${TRAINER:-nnUNetTrainerHyMUNet}
PLANS=${PLANS:-nnUNetPlans}          # or nnUNetHyMUNetPlans (from `hymunet plan`) with TRAINER=nnUNetTrainer
NUM_FOLDS=${NUM_FOLDS:-5}
NUM_GPUS=${NUM_GPUS:-1}

# SITE: activate the environment where `pip install nnunetv2-hymunet` (with the [cuda] extra) was done, e.g.
# source /path/to/venv/bin/activate
: "${nnUNet_raw:?set nnUNet_raw}" "${nnUNet_preprocessed:?set nnUNet_preprocessed}" "${nnUNet_results:?set nnUNet_results}"
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$(( ${SLURM_CPUS_PER_TASK:-12} - 1 ))}
export nnUNet_compile=${nnUNet_compile:-f}   # HyM-UNet trainers never compile unless this is true

read -r -a entries <<< "$DATASETS"
task=${SLURM_ARRAY_TASK_ID:?run this as an array job (sbatch --array=...)}
entry=${entries[$(( task / NUM_FOLDS ))]:?task $task has no dataset (only ${#entries[@]} datasets x $NUM_FOLDS folds)}
dataset=${entry%%:*}
configuration=${entry##*:}
fold=$(( task % NUM_FOLDS ))

echo "task $task: dataset $dataset, configuration $configuration, fold $fold, trainer $TRAINER, plans $PLANS"
# Resume when a checkpoint exists (re-queued or earlier time-limited run); nnU-Net starts fresh otherwise.
nnUNetv2_train "$dataset" "$configuration" "$fold" -tr "$TRAINER" -p "$PLANS" -num_gpus "$NUM_GPUS" --npz --c

# After all tasks of a dataset finished (e.g. a dependent job: sbatch --dependency=afterok:<array job id>):
#   nnUNetv2_find_best_configuration DATASET -c CONFIGURATION -tr "$TRAINER" -p "$PLANS"
#   nnUNetv2_predict -i IN -o OUT -d DATASET -c CONFIGURATION -tr "$TRAINER" -p "$PLANS" -f 0 1 2 3 4
