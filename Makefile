# pg_secrets: `make run` and `make test` are all a fresh Debian 12 machine needs.
# Each target installs what is missing first (scripts/setup.sh), quietly when nothing is.

PG_CONFIG := /usr/lib/postgresql/15/bin/pg_config
# Where rustup puts cargo: scripts/setup.sh installs Rust there when the machine has none.
export PATH := $(HOME)/.cargo/bin:$(PATH)
# Non-empty when make runs as root.
AS_ROOT := $(filter 0,$(shell id -u))
# cargo pgrx needs sudo to write into PostgreSQL's directories unless we are root.
SUDO_FLAG := $(if $(AS_ROOT),,--sudo)
SUDO := $(if $(AS_ROOT),,sudo)
PGRX_TEST_DATA := $(CURDIR)/target/pgrx-test-data
# pgrx's test server runs as this user through sudo (initdb refuses root); naming one also
# makes pgrx install the test build with sudo, which an ordinary user needs.
TEST_SERVER_USER := $(if $(AS_ROOT),postgres,$(shell id -un))

# One step at a time even under make -j: the unit tests install a test build of the library,
# which the end-to-end tests must not meet.
.NOTPARALLEL:

# cargo pgrx copies the library over the installed file in place, and a running server (the
# make run cluster) that has the old one mapped would crash; removed first, the old file lives
# on for that server, which demo.sh restarts on the new one.
REMOVE_INSTALLED_LIBRARY = libdir="$$($(PG_CONFIG) --pkglibdir)" && $(SUDO) rm -f "$$libdir/pg_secrets.so"

.PHONY: setup install run stop test unit-test e2e-test bench lint

setup:
	@scripts/setup.sh

# The release build is what runs, is tested end to end, and is measured. cargo pgrx installs
# the current version's script and the upgrade scripts (sql/pg_secrets--OLD--NEW.sql); the
# scripts of earlier releases (sql/releases/) are installed too, so that an earlier version can
# still be created, as the upgrade test does.
install: setup
	@mkdir -p target
	@$(REMOVE_INSTALLED_LIBRARY)
	@cargo pgrx install --release --pg-config $(PG_CONFIG) $(SUDO_FLAG) --package pg_secrets >target/install.log 2>&1 \
		|| { tail -50 target/install.log; exit 1; }
	@$(SUDO) install -m 644 sql/releases/*.sql $(shell $(PG_CONFIG) --sharedir)/extension/
	@echo "install: pg_secrets installed into PostgreSQL 15"

run: install
	@cargo build --quiet --release --package secrets-proxy
	@scripts/demo.sh start

stop:
	@scripts/demo.sh stop

test: unit-test e2e-test

# pgrx's own harness: #[test] and #[pg_test] functions in extension/src/tests.rs.
unit-test: setup
	@mkdir -p $(PGRX_TEST_DATA)
	@$(if $(AS_ROOT),chown postgres: $(PGRX_TEST_DATA))
	@$(REMOVE_INSTALLED_LIBRARY)
	@cargo pgrx test pg15 --package pg_secrets --runas $(TEST_SERVER_USER) --pgdata $(PGRX_TEST_DATA)

# The proxy's own unit tests, the proxy binary (one end-to-end test runs it as its own process
# to send it signals), then real clusters and real clients. Runs after unit-test has replaced the installed library with
# its test build, so it installs the release build first.
e2e-test: install
	@cargo test --release --package secrets-proxy
	@cargo build --quiet --release --package secrets-proxy
	@cargo test --release --package pg_secrets_e2e -- --test-threads=2

bench: install
	@scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
