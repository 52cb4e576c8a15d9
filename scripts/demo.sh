#!/usr/bin/env bash
# `make run` / `make stop`: a local PostgreSQL 15 cluster in .pg/ (git-ignored) with
# pg_secrets preloaded, a master key, the extension, and a sample secret to play with.
# Running it again reuses the cluster and the key.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
# PG_SECRETS_DEMO_DIR: where the cluster lives instead of .pg/ (the test of `make run` uses it).
ROOT="${PG_SECRETS_DEMO_DIR:-$PWD/.pg}"
DATA="$ROOT/data"
KEY_FILE="$ROOT/master.key"
PORT="${PG_SECRETS_PORT:-54329}"
PROXY_PORT="${SECRETS_PROXY_PORT:-6432}"
PROXY_PID="$ROOT/proxy.pid"

# initdb refuses to run as root: then the server runs as the postgres system user.
as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_demo() {
    as_server_user "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$ROOT" -p "$PORT" -U postgres -d postgres "$@"
}

proxy_exits_within_10s() {
    for _ in $(seq 100); do
        [ "$(cat "/proc/$1/comm" 2>/dev/null)" = secrets-proxy ] || return 0
        sleep 0.1
    done
    return 1
}

stop_proxy() {
    # After a reboot the recorded pid may belong to another program: only a secrets-proxy is
    # stopped.
    local pid
    pid="$(cat "$PROXY_PID" 2>/dev/null || true)"
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = secrets-proxy ] \
        && kill "$pid" 2>/dev/null; then
        # SIGTERM lets sessions finish; past 10 s SIGINT ends them. Waited for, so that a
        # proxy started next finds the port free.
        proxy_exits_within_10s "$pid" || {
            kill -INT "$pid" 2>/dev/null || true
            proxy_exits_within_10s "$pid" || kill -KILL "$pid" 2>/dev/null || true
        }
        echo "stopped secrets-proxy"
    fi
    rm -f "$PROXY_PID"
}

server_running() {
    as_server_user "$PG_BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

stop() {
    stop_proxy
    # pg_ctl status, not the pid file: a crash or a reboot leaves the file behind.
    if server_running; then
        as_server_user "$PG_BIN/pg_ctl" stop -D "$DATA" -m fast -s -w
        echo "stopped the pg_secrets demo cluster"
    else
        echo "the pg_secrets demo cluster is not running"
    fi
}

start_proxy() {
    stop_proxy
    cat >"$ROOT/proxy.toml" <<TOML
[listen]
tcp = "127.0.0.1:$PROXY_PORT"
admin = "127.0.0.1:$((PROXY_PORT + 1))"

[store]
host = "$ROOT"
port = $PORT
user = "secrets_proxy"

[[route]]
database = "demo"
secret = "demo/app/db"
allow = ["trust"]
host = "127.0.0.1"
port = $PORT

# The same database for clients that say they are "pooled": transaction pooling, where
# every such client shares five server sessions.
[[route]]
database = "demo"
user = "pooled"
secret = "demo/app/db"
allow = ["trust"]
host = "127.0.0.1"
port = $PORT
pool_mode = "transaction"
pool_size = 5
TOML
    target/release/secrets-proxy --config "$ROOT/proxy.toml" >"$ROOT/proxy.log" 2>&1 &
    echo $! >"$PROXY_PID"
    # Ready once it says it listens (it has bound its ports), or given up on when it exits.
    for _ in $(seq 100); do
        kill -0 "$(cat "$PROXY_PID")" 2>/dev/null || break
        grep -q "secrets-proxy listening" "$ROOT/proxy.log" && break
        sleep 0.1
    done
    if ! kill -0 "$(cat "$PROXY_PID")" 2>/dev/null; then
        echo "secrets-proxy did not start (set SECRETS_PROXY_PORT to use another port than $PROXY_PORT):" >&2
        tail -5 "$ROOT/proxy.log" >&2
        rm -f "$PROXY_PID"
        return 1
    fi
}

start() {
    # The server's socket is in $ROOT, and a Unix socket's path holds at most 107 bytes: a
    # deeper folder would fail only inside the server log.
    local socket="$ROOT/.s.PGSQL.$PORT"
    if [ "$(printf %s "$socket" | wc -c)" -gt 107 ]; then
        echo "the demo cluster's socket $socket would be longer than a Unix socket path may be (107 bytes); set PG_SECRETS_DEMO_DIR to a shorter folder" >&2
        exit 1
    fi
    mkdir -p "$ROOT"
    if [ ! -f "$KEY_FILE" ]; then
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' | sed 's/^/demo:/' >"$KEY_FILE"; echo >>"$KEY_FILE")
        echo "created a new master key in $KEY_FILE (mode 0600); back it up: without it the secrets are lost"
    fi
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$ROOT" "$KEY_FILE"; fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_server_user "$PG_BIN/initdb" -D "$DATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
            -E UTF8 >"$ROOT/initdb.log"
        cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$ROOT'
unix_socket_permissions = 0700
shared_preload_libraries = 'pg_secrets'
pg_secrets.key_file = '$KEY_FILE'
CONF
        # The socket is reachable only by the cluster's owner (and root), so local logins
        # as the database superuser need no password in the demo.
        sed -i 's/^local\(\s\+\)all\(\s\+\)all\(\s\+\)peer/local\1all\2all\3trust/' "$DATA/pg_hba.conf"
    fi
    # A server that started with another build of the library goes on running that one: it
    # is restarted, so that ALTER EXTENSION UPDATE below meets the library it belongs with.
    local library
    library="$(sha256sum "$("$PG_BIN/pg_config" --pkglibdir)/pg_secrets.so" | cut -d' ' -f1)"
    if server_running && [ "$(cat "$ROOT/library.sha256" 2>/dev/null)" != "$library" ]; then
        echo "restarting the demo cluster: it runs another build of pg_secrets than the one installed"
        as_server_user "$PG_BIN/pg_ctl" stop -D "$DATA" -m fast -s -w
    fi
    if ! server_running; then
        as_server_user "$PG_BIN/pg_ctl" start -D "$DATA" -l "$ROOT/server.log" -s -w -t 60
        echo "$library" >"$ROOT/library.sha256"
    fi
    # A login role `app` whose password only pg_secrets knows, and the role the proxy reads
    # credentials as (over the Unix socket, no password).
    psql_demo -t -o /dev/null <<'SQL'
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_secrets;
-- A cluster made by an earlier release is brought up to this one.
ALTER EXTENSION pg_secrets UPDATE;
-- No host: the credential names this cluster, so a rotation changes the password and the
-- secret in one local transaction. The proxy's routes name the address to reach it at.
SELECT secrets.create_secret('demo/app/db',
         json_build_object('engine', 'postgres', 'dbname', 'postgres',
                           'username', 'app', 'password', secrets.get_random_password())::text,
         description => 'Sample database credential created by make run')
 WHERE NOT EXISTS (SELECT FROM secrets.list_secrets('demo/app/db'));
-- Demo clusters made before 0.2.0 named 127.0.0.1 in the credential, and rotations over TCP
-- now need TLS, which the demo server does not offer: the credential loses the address (same
-- password) and rotation is pointed at it again.
DO $migrate$
BEGIN
    IF secrets.get_secret_value('demo/app/db')::jsonb ? 'host' THEN
        PERFORM secrets.put_secret_value('demo/app/db',
                  (secrets.get_secret_value('demo/app/db')::jsonb - 'host' - 'port')::text);
        PERFORM secrets.rotate_secret('demo/app/db', 'postgres-single-user', 'rate(1 days)',
                                      rotate_immediately => false, new_target => true);
    END IF;
END
$migrate$;
DO $demo$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN
        CREATE ROLE app LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'secrets_proxy') THEN
        CREATE ROLE secrets_proxy LOGIN IN ROLE secrets_reader;
    END IF;
    -- Inside PL/pgSQL, so the statement with the password is never logged as text.
    EXECUTE format('ALTER ROLE app PASSWORD %L',
                   secrets.get_secret_value('demo/app/db')::json ->> 'password');
END
$demo$;
-- The background worker rotates app's password every day from now on.
SELECT secrets.rotate_secret('demo/app/db', 'postgres-single-user', 'rate(1 days)',
                             rotate_immediately => false)
 WHERE secrets.describe_secret('demo/app/db') -> 'rotation' ->> 'rotator' IS NULL;
SQL
    start_proxy
    local connect="psql -h $ROOT -p $PORT -U postgres postgres"
    if [ "$(id -u)" -eq 0 ]; then connect="runuser -u postgres -- $connect"; fi
    cat <<TXT

pg_secrets is running: PostgreSQL 15 on 127.0.0.1:$PORT, data in $ROOT/, key in $KEY_FILE.

Connect:   $connect

secrets-proxy listens on 127.0.0.1:$PROXY_PORT; connect as the application would, with no password:
           psql -h 127.0.0.1 -p $PROXY_PORT -d demo -c 'SELECT current_user'
           (logs in as "app" with the password in secret demo/app/db; log: $ROOT/proxy.log)
           psql -h 127.0.0.1 -p $PROXY_PORT -d demo -U pooled -c 'SELECT pg_backend_pid()'
           (transaction pooling: every "pooled" client shares five server sessions)

Try:
  SELECT * FROM secrets.list_secrets();
  SELECT secrets.describe_secret('demo/app/db');
  SELECT secrets.get_secret_value('demo/app/db');
  SELECT secrets.rotate_secret('demo/app/db');   -- app's password changes now; the proxy keeps working
  SELECT secrets.describe_secret('demo/app/db') -> 'rotation';
  SELECT secrets.create_secret('demo/api/key', secrets.get_random_password(), description => 'an API key');
  SELECT * FROM secrets.list_secret_version_ids('demo/app/db', true);
  SELECT secrets.get_secret_value('demo/app/db', version_stage => 'PREVIOUS');
  SELECT secrets.delete_secret('demo/app/db', 7);  SELECT secrets.restore_secret('demo/app/db');
  SELECT secrets.grant_access('demo/*', 'app', '{describe}');
  SELECT * FROM secrets.check_access('app', 'get', 'demo/app/db');
  SELECT at, "current_user", action, secret_name, outcome FROM secrets.audit_log ORDER BY id DESC LIMIT 10;
  SELECT * FROM secrets.verify_audit_log();

From an application, pass values as bind parameters, never as literals in the SQL text.
Stop it with: make stop
TXT
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
