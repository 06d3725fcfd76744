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
srun --unbuffered --output /scratch/u/run/logs/%A_%a/%A_%a_%t_log.out --error /scratch/u/run/logs/%A_%a/%A_%a_%t_log.err --container-image=/images/caffe-runner.sqsh --container-mounts=/data/imgs:/data/imgs,/models/m:/models/m,/scratch/u/run:/scratch/u/run --container-workdir=/scratch/u/run '--export=ALL,CAFFE_RUNNER_CONTAINER_RUNTIME=pyxis,CAFFE_RUNNER_IMAGE=/images/caffe-runner.sqsh,CAFFE_RUNNER_IMAGE_ID=size=1234;mtime=2026-11-25T17:00:00Z' python -u -m submitit.core._submit /scratch/u/run/logs/%j
