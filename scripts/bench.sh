#!/usr/bin/env bash
# `make bench`: runs the benchmark binary of the e2e crate against the installed extension.
set -euo pipefail
cd "$(dirname "$0")/.."
# The idle-clients measurement runs the proxy binary as its own process.
cargo build --quiet --release --package secrets-proxy
cargo run --quiet --release --package pg_secrets_e2e --bin bench
