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
srun --unbuffered --output /scratch/u/run/logs/%A_%a/%A_%a_%t_log.out --error /scratch/u/run/logs/%A_%a/%A_%a_%t_log.err podman run --rm --network host --entrypoint python --workdir /scratch/u/run --pull never --env SLURM_JOB_ID --env SLURM_ARRAY_JOB_ID --env SLURM_ARRAY_TASK_ID --env SLURM_NTASKS --env SLURM_JOB_NUM_NODES --env SLURM_NODEID --env SLURM_JOB_NODELIST --env SLURM_PROCID --env SLURM_LOCALID --env SLURM_RESTART_COUNT --env SLURM_CPUS_PER_TASK --env SLURM_JOB_GPUS --env SLURM_STEP_GPUS --env CUDA_VISIBLE_DEVICES --env GPU_DEVICE_ORDINAL --env SUBMITIT_EXECUTOR --env SUBMITIT_FOLDER --env CAFFE_RUNNER_LOG --env CAFFE_RUNNER_THREADS --env GLOG_minloglevel --env OMP_NUM_THREADS --env OPENBLAS_NUM_THREADS --env MKL_NUM_THREADS --env HOME --env LANG --env TZ --env CAFFE_RUNNER_CONTAINER_RUNTIME=podman --env CAFFE_RUNNER_IMAGE=localhost/caffe-runner:cpu --env 'CAFFE_RUNNER_IMAGE_ID=size=1234;mtime=2026-11-25T17:00:00Z' --volume /data/imgs:/data/imgs --volume /models/m:/models/m --volume /scratch/u/run:/scratch/u/run --userns=keep-id localhost/caffe-runner:cpu -u -m submitit.core._submit /scratch/u/run/logs/%j
