#!/usr/bin/env bash
# Installs what building, running and testing pg_secrets needs, and nothing that is already
# there: Debian packages, cargo-pgrx at the version pinned by the workspace, and pgrx's
# pointer to PostgreSQL 15. Quiet when there is nothing to do. Works as root or as a user
# with sudo.
set -euo pipefail

PGRX_VERSION=0.18.0
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libclang-dev clang
          pkg-config sudo pgbouncer make)

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
