#!/usr/bin/env bash
# Installs what bifurc needs to build and test, idempotently:
#   - LLVM/MLIR 22 dev packages (Debian 12 security suite) for melior,
#   - a Python venv at .venv with ptxas (PyPI nvidia-cuda-nvcc) for PTX checks,
#   - libdevice.10.bc (PyPI nvidia-cuda-nvcc-cu12) in the same venv: the GPU
#     pipeline links it so math ops (exp, tanh, ...) become PTX.
# Quick (about a second) when everything is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- Rust -------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found; install Rust with rustup (https://rustup.rs) and open a new shell"

# --- Debian packages ----------------------------------------------------------
packages=(
    llvm-22-dev libmlir-22-dev libpolly-22-dev libclang1-22 libclang-22-dev
    libclang-common-22-dev libzstd-dev zlib1g-dev libxml2-dev mlir-22-tools
)
command -v dpkg-query >/dev/null 2>&1 ||
    die "dpkg-query not found: this script supports Debian 12 (apt); install the LLVM/MLIR 22 dev packages yourself: ${packages[*]}"
missing=()
for package in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    say "LLVM/MLIR 22 packages present"
else
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        die "need root or sudo to install: ${missing[*]}"
    fi
    say "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install failed (the LLVM 22 packages come from Debian 12's security suite: is it in your apt sources?)"
    say "packages installed"
fi

# --- ptxas in .venv -----------------------------------------------------------
find_ptxas() {
    local candidate
    for candidate in "$root"/.venv/lib/python3*/site-packages/nvidia/cu*/bin/ptxas; do
        if [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}
if ptxas="$(find_ptxas)"; then
    say "ptxas present ($ptxas)"
else
    command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for the ptxas venv)"
    if [ ! -x "$root/.venv/bin/pip" ]; then
        say "creating Python venv at .venv"
        python3 -m venv "$root/.venv" ||
            die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    fi
    say "installing nvidia-cuda-nvcc (ptxas) into .venv"
    "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --no-deps nvidia-cuda-nvcc ||
        die "pip install nvidia-cuda-nvcc failed"
    ptxas="$(find_ptxas)" || die "nvidia-cuda-nvcc installed but no ptxas under .venv/lib/python3*/site-packages/nvidia/cu*/bin"
    say "ptxas installed ($ptxas)"
fi

# --- libdevice in .venv --------------------------------------------------------
# The 13.x nvidia-cuda-nvcc wheel ships ptxas but no libdevice; the 12.x one has it.
find_libdevice() {
    local candidate
    for candidate in "$root"/.venv/lib/python3*/site-packages/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc; do
        if [ -f "$candidate" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}
if libdevice="$(find_libdevice)"; then
    say "libdevice present ($libdevice)"
else
    [ -x "$root/.venv/bin/pip" ] || die "no pip in .venv (expected after the ptxas step)"
    say "installing nvidia-cuda-nvcc-cu12 (libdevice) into .venv"
    "$root/.venv/bin/pip" install --quiet --disable-pip-version-check --no-deps nvidia-cuda-nvcc-cu12 ||
        die "pip install nvidia-cuda-nvcc-cu12 failed"
    libdevice="$(find_libdevice)" ||
        die "nvidia-cuda-nvcc-cu12 installed but no libdevice under .venv/lib/python3*/site-packages/nvidia/cuda_nvcc/nvvm/libdevice"
    say "libdevice installed ($libdevice)"
fi

say "ok"
