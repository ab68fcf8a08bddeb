#!/usr/bin/env bash
# The test command: every unit, property and end-to-end test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast "$@"
