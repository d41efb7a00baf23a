# shellcheck shell=bash
# Environment for building bifurc against Debian's LLVM/MLIR 22.
# Source it (`source scripts/env.sh`); scripts/setup.sh installs what it names.

_bifurc_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# mlir-sys 220 / tblgen: /usr/bin/llvm-config may be another LLVM (14 on Debian 12).
export MLIR_SYS_220_PREFIX=/usr/lib/llvm-22
export TABLEGEN_220_PREFIX=/usr/lib/llvm-22
export LIBCLANG_PATH=/usr/lib/llvm-22/lib

# ptxas from the PyPI package nvidia-cuda-nvcc, installed in .venv by setup.sh.
for _bifurc_ptxas in "$_bifurc_root"/.venv/lib/python3*/site-packages/nvidia/cu*/bin/ptxas; do
    if [ -x "$_bifurc_ptxas" ]; then
        export BIFURC_PTXAS="$_bifurc_ptxas"
        break
    fi
done

# libdevice (math functions as LLVM bitcode) from the PyPI package
# nvidia-cuda-nvcc-cu12, installed in .venv by setup.sh; `bifurc compile` links it.
for _bifurc_libdevice in "$_bifurc_root"/.venv/lib/python3*/site-packages/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc; do
    if [ -f "$_bifurc_libdevice" ]; then
        export BIFURC_LIBDEVICE="$_bifurc_libdevice"
        break
    fi
done

# CI: share one target dir across clones (a cold LLVM/MLIR link is slow).
# Cargo creates it when it is empty or missing.
if [ -n "${CI:-}" ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR=/var/tmp/bifurc-ci-target
fi

unset _bifurc_root _bifurc_ptxas _bifurc_libdevice
