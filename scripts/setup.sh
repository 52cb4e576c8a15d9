#!/usr/bin/env bash
# Installs what building, running and testing pg_secrets needs, and nothing that is already
# there: Debian packages, cargo-pgrx at the version pinned by the workspace, and pgrx's
# pointer to PostgreSQL 15. Quiet when there is nothing to do. Works as root or as a user
# with sudo.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang
          pkg-config sudo pgbouncer make curl ca-certificates acl)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian's pgbouncer package starts a service on port 6432, where make run's secrets-proxy
    # listens; the benchmark starts a PgBouncer of its own. A pgbouncer that was there before
    # is left alone.
    if [[ " ${missing[*]} " == *" pgbouncer "* ]] && command -v systemctl >/dev/null \
        && systemctl is-enabled --quiet pgbouncer 2>/dev/null; then
        echo "setup: stopping and disabling the pgbouncer service the package started (it takes port 6432)"
        as_root systemctl disable --now --quiet pgbouncer
    fi
fi

# Rust, when the machine has none: rustup's stable toolchain (Debian's rustc is too old for
# the workspace's rust-version). The Makefile puts ~/.cargo/bin on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    echo "setup: installing Rust with rustup into $HOME/.cargo"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y --quiet --profile minimal --no-modify-path >/dev/null
fi

# As root, the servers of make run and make test run as the postgres user, in folders of this
# checkout: every folder above it must let that user through (root's home does not).
# From the top down: a folder can be passed only once the ones above it can.
if [ "$(id -u)" -eq 0 ]; then
    checkout="$(cd "$(dirname "$0")/.." && pwd)"
    dir=""
    IFS=/ read -ra parts <<<"${checkout#/}"
    for part in "${parts[@]}"; do
        dir="$dir/$part"
        if ! runuser -u postgres -- test -x "$dir"; then
            echo "setup: letting the postgres user pass through $dir (setfacl u:postgres:x), where this checkout's clusters live"
            setfacl -m u:postgres:x "$dir"
        fi
    done
fi

# Debian starts a default cluster on port 5432; the project never uses it, and it is left
# alone. Our clusters live in project or temporary folders on their own ports.

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (about 6 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi

pgrx_home="${PGRX_HOME:-$HOME/.pgrx}"
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "$pgrx_home/config.toml"; then
    echo "setup: pointing pgrx at $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi
