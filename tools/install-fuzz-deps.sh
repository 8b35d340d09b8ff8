#!/usr/bin/env bash
# Installs what `make fuzz` and `make fuzz-ci` need, unless already there:
# cargo-afl, whose `cargo install` also builds AFL++ and its runtime for the
# current rustc (a C compiler and make, from tools/install-system-deps.sh).
# The version matches the `afl` crate in fuzz/Cargo.toml. Idempotent.
set -euo pipefail

version=0.18.2

# Where cargo-afl keeps the runtime it built for one rustc.
rustc_id="$(rustc -vV | awk '/^release:/ {r=$2} /^commit-hash:/ {h=substr($2, 1, 7)} END {print "rustc-" r "-" h}')"
runtime="${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs/$rustc_id/afl.rs-$version/afl-llvm/afl-compiler-rt.o"

if ! cargo afl --version 2>/dev/null | grep -q "^cargo-afl $version "; then
    echo "Installing cargo-afl $version (builds AFL++)"
    cargo install --locked --force --version "$version" cargo-afl
elif [ ! -f "$runtime" ]; then
    echo "Building AFL++ for $rustc_id"
    cargo afl config --build --force
fi
