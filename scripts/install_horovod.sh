#!/usr/bin/env bash
# Build Horovod from its PyPI source against the torch installed in $PYTHON's environment, and install it.
#
# Horovod 0.28.1 is the last release and does not build against torch >= 2.1 as shipped (fixed upstream on
# master only). This script downloads the pinned sdist, checks its sha256, applies the edits below (each one
# fails loudly if the line it expects is gone), builds a wheel, caches it, installs it and runs
# `horovodrun --check-build`. A second run with nothing changed reuses the installed build or the cached wheel.
#
# Environment (all optional):
#   PYTHON                      interpreter of the target environment (default: python3)
#   HOROVOD_GPU_OPERATIONS      e.g. NCCL: build GPU collectives (needs the CUDA toolkit, and NCCL)
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures for Horovod's CUDA kernels (default: 75,80,86,90)
#   CUDA_HOME                   CUDA toolkit root (default: /usr/local/cuda when it holds bin/nvcc)
#   HOROVOD_WHEEL_CACHE         where built wheels are kept (default: ~/.cache/hvd_megdet/wheels)
#   HOROVOD_SDIST               a local horovod-0.28.1.tar.gz (still sha256-checked), for a machine without network:
#                               nothing is downloaded, and the CMake already there builds it (env's bin/, else PATH)
#   HOROVOD_NCCL_PIP            1: link the NCCL of $PYTHON's nvidia-nccl pip package (the one torch loads) for
#                               HOROVOD_GPU_OPERATIONS=NCCL, instead of a system NCCL
#   HOROVOD_CUDA_PIP            1: without a CUDA toolkit, take nvcc, the CUDA headers and CCCL from NVIDIA's pip
#                               wheels (cuda-toolkit[nvcc,cccl], torch's release; CUDA 13 and newer), in a folder of
#                               this build only
set -euo pipefail

HOROVOD_VERSION=0.28.1
HOROVOD_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0
# CMake 4 refuses gloo's `cmake_minimum_required(VERSION 2.8.12)`; 3.31 is the last release that accepts it.
CMAKE_VERSION=3.31.6
# The build recipe's id, part of the cache key: change it whenever an edit changes what is built (the patches,
# the flags), so that installed builds and cached wheels are rebuilt. (It was the script's sha256 until the
# offline and pip-NCCL options, which leave the default build unchanged, were added.)
RECIPE=7c1e0d4a9b35

say() { echo "install_horovod: $*" >&2; }
die() { say "error: $*"; exit 1; }
PYTHON=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)') || die "no Python at ${PYTHON:-python3}"
BIN_DIR=$(dirname "$PYTHON")
CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd_megdet/wheels}

# Folders of this run only, removed however it ends.
TEMP_DIRS=()
trap 'rm -rf "${TEMP_DIRS[@]}"' EXIT

torch_info=$("$PYTHON" -c 'import sys, torch; print(torch.__version__, torch.version.cuda or "cpu", "%d.%d" % sys.version_info[:2])') \
    || die "torch is not importable with $PYTHON; install requirements.txt first"
read -r TORCH_VERSION TORCH_CUDA PY_VERSION <<<"$torch_info"

# A CUDA build of torch makes Horovod's CMake compile CUDA code, so it needs the toolkit. Without one,
# torch.utils.cpp_extension finds no CUDA_HOME and Horovod builds for CPU tensors only (Gloo, and MPI if present).
if [ "$TORCH_CUDA" != cpu ]; then
    if [ "${HOROVOD_CUDA_PIP:-0}" = 1 ]; then
        [ "${TORCH_CUDA%%.*}" -ge 13 ] || die "HOROVOD_CUDA_PIP=1 needs torch for CUDA 13 or newer (the wheels' layout); torch has CUDA $TORCH_CUDA"
        # NVIDIA's cuda-toolkit metapackage pins its parts to one release: the one torch was installed with.
        toolkit=$("$PYTHON" -c 'import importlib.metadata as m; print("==" + m.version("cuda-toolkit"))' 2>/dev/null) \
            || toolkit="==$TORCH_CUDA.*"
        CUDA_HOME=$(mktemp -d) && TEMP_DIRS+=("$CUDA_HOME")
        say "CUDA compiler and headers from pip (cuda-toolkit[nvcc,cccl]$toolkit), for this build only"
        "$PYTHON" -m pip install -q --target "$CUDA_HOME" "cuda-toolkit[nvcc,cccl]$toolkit" \
            || die "HOROVOD_CUDA_PIP=1: pip install cuda-toolkit[nvcc,cccl]$toolkit failed"
        # The wheels install into nvidia/cu<major>/{bin,include,lib,nvvm}, a toolkit root, but with lib/ where nvcc
        # links from lib64/, and no unversioned libcudart.so, which CMake's FindCUDAToolkit looks for.
        export CUDA_HOME="$CUDA_HOME/nvidia/cu${TORCH_CUDA%%.*}"
        ln -s lib "$CUDA_HOME/lib64"
        ln -s "libcudart.so.${TORCH_CUDA%%.*}" "$CUDA_HOME/lib/libcudart.so"
    fi
    if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDA_HOME=/usr/local/cuda
    fi
    if [ -n "${CUDA_HOME:-}" ]; then
        [ -x "$CUDA_HOME/bin/nvcc" ] || die "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
        # CMake finds the toolkit through the nvcc it runs; a wrapper elsewhere on PATH misleads it.
        export HOROVOD_CUDA_HOME=$CUDA_HOME CUDAToolkit_ROOT=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
        export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-75,80,86,90}
        BUILD_KIND="cuda-$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    elif [ -n "${HOROVOD_GPU_OPERATIONS:-}" ]; then
        die "HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS needs the CUDA toolkit $TORCH_CUDA (nvcc); install it and set CUDA_HOME to its root"
    else
        say "torch is a CUDA $TORCH_CUDA build but no CUDA toolkit was found: building a CPU-only Horovod (Gloo)."
        say "For GPU tensors install the CUDA toolkit $TORCH_CUDA and set CUDA_HOME, then run this again."
        BUILD_KIND=cpu
    fi
else
    BUILD_KIND=cpu
fi
command -v mpicc >/dev/null 2>&1 && BUILD_KIND="$BUILD_KIND-mpi"
[ "${HOROVOD_NCCL_PIP:-0}" = 1 ] && BUILD_KIND="$BUILD_KIND-ncclpip"

# Everything that changes the built binary goes into the key, the build recipe included.
KEY="horovod-$HOROVOD_VERSION-torch-$TORCH_VERSION-py$PY_VERSION-$BUILD_KIND-gpuops-${HOROVOD_GPU_OPERATIONS:-none}-cc-${HOROVOD_BUILD_CUDA_CC_LIST:-none}-$RECIPE"
KEY=${KEY//[^A-Za-z0-9._-]/_}
STAMP="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/.hvd_megdet_horovod_key"

check_build() {
    local out
    out=$("$BIN_DIR/horovodrun" --check-build) || die "horovodrun --check-build failed"
    echo "$out"
    grep -q '\[X\] PyTorch' <<<"$out" || die "Horovod was built without PyTorch"
    grep -q '\[X\] Gloo' <<<"$out" || die "Horovod was built without Gloo"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && "$PYTHON" -c 'import horovod.torch' 2>/dev/null; then
    say "Horovod $HOROVOD_VERSION already installed for this torch and build ($KEY)"
    exit 0
fi

mkdir -p "$CACHE"
WHEEL_DIR="$CACHE/$KEY"
if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    WORK=$(mktemp -d) && TEMP_DIRS+=("$WORK")
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION ($BUILD_KIND); this takes a few minutes"
    if [ -n "${HOROVOD_SDIST:-}" ]; then
        cp "$HOROVOD_SDIST" "$WORK/horovod-$HOROVOD_VERSION.tar.gz" || die "HOROVOD_SDIST=$HOROVOD_SDIST: cannot read it"
        HOROVOD_CMAKE=$(PATH="$BIN_DIR:$PATH" command -v cmake) || die "HOROVOD_SDIST builds offline and needs a CMake; none found"
    else
        "$PYTHON" -m pip install -q "cmake==$CMAKE_VERSION"
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
        HOROVOD_CMAKE="$BIN_DIR/cmake"
    fi
    echo "$HOROVOD_SHA256  $WORK/horovod-$HOROVOD_VERSION.tar.gz" | sha256sum -c --quiet - \
        || die "sha256 mismatch for horovod-$HOROVOD_VERSION.tar.gz"
    tar -xzf "$WORK/horovod-$HOROVOD_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"

    # patch FILE OLD NEW: replace a line that must exist exactly once.
    patch_line() {
        local file="$SRC/$1" old=$2 new=$3 count
        count=$(grep -cF -- "$old" "$file" || true)
        [ "$count" = 1 ] || die "patch: expected exactly one '$old' in $1, found $count"
        OLD="$old" NEW="$new" "$PYTHON" -c 'import os, sys; p = sys.argv[1]; s = open(p).read(); open(p, "w").write(s.replace(os.environ["OLD"], os.environ["NEW"]))' "$file"
    }
    # torch >= 2.1 headers use C++20 `requires` clauses.
    patch_line horovod/torch/CMakeLists.txt "set(CMAKE_CXX_STANDARD 14)" "set(CMAKE_CXX_STANDARD 20)"
    # Mixing a C++20 torch extension with C++11/14 gloo duplicates gloo::rendezvous::Store::kDefaultTimeout at link.
    patch_line CMakeLists.txt "set(CMAKE_CXX_STANDARD 14)" "set(CMAKE_CXX_STANDARD 17)"
    patch_line third_party/gloo/CMakeLists.txt '-std=c++11 -fPIC' '-std=c++17 -fPIC'
    # Horovod 0.28.1 creates each process set's Gloo device (process set 0's, which carries every collective,
    # included) from the new context's own interface name, which is empty, not from HOROVOD_GLOO_IFACE: Gloo's
    # data then goes over the interface of the host name, whatever `horovodrun --network-interface` says
    # (found by `make multihost-test`: 114 MB through eth0, 0.3 MB through the eth1 that was named).
    patch_line horovod/common/gloo/gloo_context.cc "  assert(global_context.IsEnabled());" \
        "  assert(global_context.IsEnabled());
  gloo_iface_ = global_context.gloo_iface_;"

    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
    cmake_major=$("$HOROVOD_CMAKE" --version | sed -n 's/^cmake version \([0-9]*\).*/\1/p')
    if [ "${cmake_major:-0}" -ge 4 ]; then
        export CMAKE_POLICY_VERSION_MINIMUM=3.5  # CMake 4 configures gloo only with this
    fi
    if [ "${HOROVOD_NCCL_PIP:-0}" = 1 ]; then
        nccl=$("$PYTHON" -c 'import importlib.util as u; print(list(u.find_spec("nvidia.nccl").submodule_search_locations)[0])') \
            || die "HOROVOD_NCCL_PIP=1: no nvidia.nccl package (nvidia-nccl-cu*) in $PYTHON's environment"
        # The wheel has lib/libnccl.so.2 only; CMake's find_library wants libnccl.so. At run time torch has
        # already loaded libnccl.so.2 from the wheel, so Horovod's library finds it loaded.
        mkdir -p "$WORK/nccl_lib" && ln -sf "$nccl/lib/libnccl.so.2" "$WORK/nccl_lib/libnccl.so"
        export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$WORK/nccl_lib" HOROVOD_NCCL_LINK=SHARED
    fi
    # Without make (a pip-installed CMake and ninja, say), CMake's Ninja generator; quiet, because Horovod's
    # setup.py passes a verbose build's VERBOSE=1 on to the build tool, which ninja takes for a target.
    quiet=()
    if ! command -v make >/dev/null 2>&1 && PATH="$BIN_DIR:$PATH" command -v ninja >/dev/null 2>&1; then
        export CMAKE_GENERATOR=Ninja PATH="$BIN_DIR:$PATH"
    fi
    [ "${CMAKE_GENERATOR:-}" = Ninja ] && quiet=(--config-settings verbose=false)
    export HOROVOD_CMAKE MAKEFLAGS="-j$(nproc)"
    (cd "$SRC" && "$PYTHON" -m pip wheel -q "${quiet[@]}" --no-build-isolation --no-deps . -w "$WORK/dist") \
        || die "Horovod build failed (see the compiler output above)"
    mkdir -p "$WHEEL_DIR"
    cp "$WORK"/dist/horovod-*.whl "$WHEEL_DIR/"
else
    say "using the cached wheel in $WHEEL_DIR"
fi

"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
check_build
echo "$KEY" >"$STAMP"
say "installed ($KEY)"
