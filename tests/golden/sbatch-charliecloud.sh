#!/bin/bash

# Parameters
#SBATCH --array=0-2%3
#SBATCH --cpus-per-task=8
#SBATCH --error=/scratch/u/run/logs/%A_%a/%A_%a_0_log.err
#SBATCH --gres=gpu:1
#SBATCH --job-name=caffe-runner
#SBATCH --mem=16384M
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/u/run/logs/%A_%a/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --signal=USR2@90
#SBATCH --time=120
#SBATCH --wckey=submitit

# setup

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/u/run/logs/%A_%a/%A_%a_%t_log.out --error /scratch/u/run/logs/%A_%a/%A_%a_%t_log.err env USER=alice ch-run '--unset-env=!(SLURM_JOB_ID|SLURM_ARRAY_JOB_ID|SLURM_ARRAY_TASK_ID|SLURM_NTASKS|SLURM_JOB_NUM_NODES|SLURM_NODEID|SLURM_JOB_NODELIST|SLURM_PROCID|SLURM_LOCALID|SLURM_RESTART_COUNT|SLURM_CPUS_PER_TASK|SLURM_JOB_GPUS|SLURM_STEP_GPUS|CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|SUBMITIT_EXECUTOR|SUBMITIT_FOLDER|CAFFE_RUNNER_LOG|CAFFE_RUNNER_THREADS|GLOG_minloglevel|OMP_NUM_THREADS|OPENBLAS_NUM_THREADS|MKL_NUM_THREADS|HOME|LANG|TZ)' --set-env --set-env=CAFFE_RUNNER_CONTAINER_RUNTIME=charliecloud --set-env=CAFFE_RUNNER_IMAGE=/images/caffe-runner.sqfs '--set-env=CAFFE_RUNNER_IMAGE_ID=size=1234;mtime=2026-11-25T17:00:00Z' --bind /data:/data --bind /models:/models --bind /scratch:/scratch --cd /scratch/u/run /images/caffe-runner.sqfs -- python -u -m submitit.core._submit /scratch/u/run/logs/%j
