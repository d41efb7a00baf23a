#!/usr/bin/env bash
# The project's test command (also what CI runs, via .ci/run):
# set-up, format check, clippy (with and without CUDA code), API docs
# without broken links, all tests.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "setup"
scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets"
cargo clippy --workspace --all-targets -- -D warnings

# The CUDA runtime is compiled (and its GPU-free checks run) without a GPU:
# cudarc loads libcuda at run time.
step "cargo clippy --workspace --features cuda (the runtime's backend and bifurc run --device cuda)"
cargo clippy --workspace --features cuda --all-targets -- -D warnings

step "cargo doc --workspace --no-deps (warnings are errors: no broken links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --features cuda --no-deps -q

step "cargo test --workspace"
cargo test --workspace

step "cargo test -p bifurc-runtime --features cuda"
cargo test -p bifurc-runtime --features cuda

# The README's build-time example (its own workspace, so not in the
# commands above): bifurc::compile from a build.rs, the manifest read back
# through the runtime. --locked: its Cargo.lock must be up to date.
step "examples/build-integration"
integration_target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --locked --manifest-path examples/build-integration/Cargo.toml --target-dir "$integration_target"
"$integration_target/debug/bifurc-build-integration" > /dev/null

printf '\nPASS: scripts/test.sh (fmt, clippy, clippy+cuda, docs, tests, build-integration)\n'
