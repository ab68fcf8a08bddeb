#!/usr/bin/env bash
# The test command: every unit, property and end-to-end test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Code-health gate first: a formatting or lint failure is cheaper to see than a test run.
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast "$@"
