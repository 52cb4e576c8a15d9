#!/usr/bin/env bash
# `make bench`: runs the benchmark binary of the e2e crate against the installed extension.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release --package pg_secrets_e2e --bin bench
