#!/usr/bin/env bash
# Build pycaffe (CPU) from the PyPI sdist brocolli-caffe==9.0.2 against Debian 12's
# libraries and pack it as a platform wheel.
#
#   docker/build-pycaffe.sh [--python PY] [--cache DIR] [--apt]
#
# Prints the path of the wheel on its last line. The wheel is cached under
# DIR/<recipe key>/ (default ~/.cache/caffe-runner/pycaffe), keyed by the sdist, the
# patch revision below, the Python version and the architecture, so a second call takes
# milliseconds. --apt installs the run-time libraries always and the build ones only when
# a build is needed.
# Used by the host install (make setup) and by docker/Dockerfile: no host paths.
set -euo pipefail

PY=${PYTHON:-python3}
CACHE=${CAFFE_RUNNER_CACHE:-$HOME/.cache/caffe-runner}/pycaffe
APT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    --apt) APT=1; shift ;;
    *) echo "build-pycaffe: unknown argument $1 (use --python PY, --cache DIR, --apt)" >&2; exit 2 ;;
  esac
done

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

[ "$APT" = 1 ] && apt_ensure $RUNTIME_DEBS

pyver=$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')
recipe=$(echo "$SDIST_SHA256 $RECIPE_REV $pyver $(uname -m)" | sha256sum | cut -c1-16)
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

if [ -f "$CACHE/sdist/$SDIST" ]; then
  cp "$CACHE/sdist/$SDIST" .
else
  "$work/venv/bin/pip" download -q --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d . >&2
fi
echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet - || { log "sha256 mismatch for $SDIST"; exit 1; }
mkdir -p "$CACHE/sdist" && cp -n "$SDIST" "$CACHE/sdist/" 2>/dev/null || true

tar xzf "$SDIST"
cd "brocolli-caffe-$SDIST_VERSION"
# Debian names the library libboost_python311.so
sed -i "s/-lboost_python /-lboost_python$pyver /" python/CMakeLists.txt
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
log "configuring (python $pyver, $multiarch)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_SKIP_RPATH=ON \
  -DCMAKE_CXX_FLAGS="-I$PYINC -I$NPINC -I/usr/include/hdf5/serial" \
  -DCMAKE_SHARED_LINKER_FLAGS="-L/usr/lib/$multiarch/hdf5/serial" >"$work/cmake.log" 2>&1 \
  || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
log "compiling (about 6 minutes on 2 cores)"
make -C build -j"${JOBS:-$(nproc)}" >"$work/make.log" 2>&1 || { tail -n 60 "$work/make.log" >&2; exit 1; }
cmake --install build >"$work/install.log" 2>&1

pkg="$work/pkg"
mkdir -p "$pkg"
cp -r build/install/python/caffe "$pkg/caffe"
find "$pkg" -name '__pycache__' -prune -exec rm -rf {} +
cat >"$pkg/setup.py" <<EOF
from setuptools import setup
from setuptools.dist import Distribution

class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True

setup(
    name="caffe",
    version="1.0.0+brocolli$SDIST_VERSION",
    description="pycaffe (CPU) built from brocolli-caffe $SDIST_VERSION against Debian 12",
    packages=["caffe", "caffe.proto", "caffe.imagenet"],
    package_data={"caffe": ["_caffe.so"], "caffe.imagenet": ["*.npy"]},
    install_requires=["numpy", "scikit-image", "six", "protobuf>=3.20"],
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
