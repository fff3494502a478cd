# edge-outbox: see README.md. `make help` lists the targets.

SHELL := /bin/bash
CARGO ?= cargo
# cargo's real output folder: CARGO_TARGET_DIR, build.target-dir in a cargo config,
# or ./target; cargo metadata knows which.
# $(shell) does not see variables given on make's command line: pass it on.
TARGET_DIR := $(shell $(if $(CARGO_TARGET_DIR),CARGO_TARGET_DIR='$(CARGO_TARGET_DIR)') $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN := $(or $(TARGET_DIR),target)/release
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
USERS := http://127.0.0.1:8081
LEDGER := http://127.0.0.1:8082

.PHONY: help deps fuzz-deps prometheus-deps nats-deps pi-deps pi size check-alerts build dist install install-files run-all watch demo demo-offline cluster-demo power-cut bench verify test test-docs check-deps clean

# mosquitto_sub as the read-only observer that run-all creates. Its password goes
# through a mosquitto_sub config file ($$XDG_CONFIG_HOME/mosquitto_sub, mode 0600),
# never the command line, where ps would show it.
OBSERVER_PW := data/mqtt/edge-observer.password
as_observer = [ -r $(OBSERVER_PW) ] || { echo "$(OBSERVER_PW) is missing: start the box with 'make run-all' first"; exit 1; }; subcfg=$$(mktemp -d); trap 'rm -rf "$$subcfg"' EXIT; printf -- '-u edge-observer\n-P %s\n' "$$(cat $(OBSERVER_PW))" > "$$subcfg/mosquitto_sub"; chmod 600 "$$subcfg/mosquitto_sub"; export XDG_CONFIG_HOME="$$subcfg"

# schemathesis, for the API fuzz test (box/tests/fuzz.rs): a pinned version from PyPI
# in a virtualenv in cargo's output folder.
SCHEMATHESIS_VERSION := 4.32.5
FUZZ_VENV := $(or $(TARGET_DIR),target)/schemathesis-venv

# The Raspberry Pi build (64-bit Raspberry Pi OS, glibc >= 2.34): Debian's rustc-web
# with its arm64 std, since rustup here cannot download targets
# (../shared/FIELD-NOTES.md); its own output folder, since it is another compiler.
PI_TARGET := aarch64-unknown-linux-gnu
PI_DIR := $(or $(TARGET_DIR),target)/pi
PI_BIN := $(PI_DIR)/$(PI_TARGET)/dist
PI_ENV := RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO_TARGET_DIR='$(PI_DIR)' \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
DIST_BIN := $(or $(TARGET_DIR),target)/dist

CYCLES ?= 20
MODE ?= power

help:
	@echo "make run-all  install Mosquitto if missing, build, run the broker and both services (Ctrl-C stops all)"
	@echo "make test     install Mosquitto, Prometheus and schemathesis (for the API fuzz test) if missing,"
	@echo "              run every test against real brokers and databases, the library's doc examples,"
	@echo "              and check its docs, dependencies and the alert rules"
	@echo "make pi       cross-build the dist binaries for a Raspberry Pi (aarch64), installing the toolchain if missing"
	@echo "make size     the stripped size of each dist binary (here and, if built, for the Pi), and RSS idle and under load"
	@echo "make install  build the dist binaries, then install them, the systemd units and docs (PREFIX=/usr/local, DESTDIR)"
	@echo "make dist     build the binaries that go on a box (LTO, stripped) into cargo's output folder, dist/"
	@echo "make fuzz-deps  install schemathesis (for the API fuzz test) into cargo's output folder"
	@echo "make watch    print every event on the broker (needs run-all in another terminal)"
	@echo "make demo     create a user and follow its events step by step (needs run-all)"
	@echo "make demo-offline  a box of its own keeps working with its broker stopped, then drains"
	@echo "make cluster-demo  both services over a 3-node NATS cluster: a node dies, a host is cut off (root for namespaces)"
	@echo "make power-cut  CYCLES=20 power cuts under load (root, loop devices), then check; MODE=kill kills one component at a time"
	@echo "make bench    throughput and latency against the disk and the broker (quick; BENCH=full for longer; BENCH=scale for a 1,000,000-event backlog, 10,000,000 rows of history, 10,000 streams and disk bytes, about 10 minutes)"
	@echo "make verify   check the cross-service invariants of ./data (after the box drained)"
	@echo "make build    build in release mode"
	@echo "make test-docs, make check-deps  parts of make test: the library's doc examples and docs; its dependencies"
	@echo "make clean    remove build output and ./data"

# Mosquitto and its clients, from Debian's packages, when missing.
deps:
	@if { ! command -v mosquitto && [ ! -x /usr/sbin/mosquitto ]; } >/dev/null 2>&1 || ! command -v mosquitto_pub >/dev/null 2>&1; then \
		echo "installing mosquitto and mosquitto-clients"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y mosquitto mosquitto-clients || { $(SUDO) apt-get update && $(SUDO) apt-get install -y mosquitto mosquitto-clients; }; \
	fi

# Prometheus and promtool (Debian's prometheus package), for the scrape test
# (box/tests/prometheus.rs) and the alert rules' checks.
prometheus-deps:
	@if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then \
		echo "installing prometheus"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y --no-install-recommends prometheus || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus; }; \
	fi

# nats-server (Debian's package), for the NATS cluster tests and make cluster-demo.
nats-deps:
	@if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then \
		echo "installing nats-server"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y --no-install-recommends nats-server || { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends nats-server; }; \
	fi

# The aarch64 cross toolchain from Debian's archive (~260 MB), when missing. rustc-web
# and its arm64 std must come in one command: their versions must match.
pi-deps:
	@installed() { for p in "$$@"; do [ "$$(dpkg-query -W -f='$${db:Status-Abbrev}' "$$p" 2>/dev/null)" = "ii " ] || return 1; done; }; \
	if ! installed rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; then \
		[ "$$(dpkg --print-architecture 2>/dev/null)" = amd64 ] && grep -qx 'ID=debian' /etc/os-release \
			|| { echo "make pi: the cross toolchain is installed from Debian 12's archive on x86_64 (amd64) only; PI=0 make test leaves the Pi build out"; exit 1; }; \
		echo "installing the aarch64 cross toolchain (rustc-web, libstd-rust-web-dev:arm64, gcc-aarch64-linux-gnu, qemu-user)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ $(SUDO) dpkg --add-architecture arm64 && $(SUDO) apt-get update \
			&& $(SUDO) apt-get install -y --no-remove --no-install-recommends rustc-web cargo-web libstd-rust-web-dev:arm64 \
				gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; } \
			|| { echo "make pi: cannot install the aarch64 cross toolchain (see above; --no-remove: it never removes a package, e.g. Debian's rustc, which rustc-web conflicts with)"; exit 1; }; \
	fi

# The box's three binaries for aarch64, in the dist profile (Cargo.toml), into $(PI_BIN).
pi: pi-deps
	$(PI_ENV) /usr/bin/cargo build --locked --profile dist --target $(PI_TARGET) -p edge-box --bins
	@for b in user-service transaction-service edge-outbox; do \
		printf 'pi: %-20s %9d bytes\n' "$$b" "$$(stat -c %s '$(PI_BIN)'/$$b)"; done

# Stripped sizes of the dist binaries for this machine, and for the Pi if built; then
# the services' resident memory idle and under a bounded load (benches/footprint.sh).
size: deps dist
	@for d in '$(DIST_BIN)' '$(PI_BIN)'; do for b in user-service transaction-service edge-outbox; do \
		[ -f "$$d/$$b" ] && printf '%-60s %9d bytes\n' "$$d/$$b" "$$(stat -c %s "$$d/$$b")"; done; done; true
	@PATH="$$PATH:/usr/sbin" bash benches/footprint.sh '$(DIST_BIN)'

# Python's venv module (Debian: python3-venv), then schemathesis into $(FUZZ_VENV).
fuzz-deps:
	@if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && command -v python3 >/dev/null; then \
		echo "schemathesis $(SCHEMATHESIS_VERSION) needs Python 3.11 or later; python3 here is $$(python3 --version 2>&1)"; exit 1; \
	fi
	@if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
		echo "installing python3-venv"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(SUDO) apt-get install -y python3-venv || { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv; }; \
	fi
	@if ! "$(FUZZ_VENV)/bin/st" --version 2>/dev/null | grep -qxF "st, version $(SCHEMATHESIS_VERSION)"; then \
		echo "installing schemathesis $(SCHEMATHESIS_VERSION) into $(FUZZ_VENV)"; \
		rm -rf "$(FUZZ_VENV)" && python3 -m venv "$(FUZZ_VENV)" \
			&& "$(FUZZ_VENV)/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$(SCHEMATHESIS_VERSION)"; \
	fi

build:
	$(CARGO) build --release --locked

# The binaries that go on a box: the dist profile (Cargo.toml), into $(DIST_BIN).
dist:
	$(CARGO) build --locked --profile dist -p edge-box --bins

# Binaries into $(PREFIX)/bin, the systemd units (naming them there) into
# /etc/systemd/system, the example settings, broker config and docs into
# $(PREFIX)/share/doc/edge-outbox; all under $(DESTDIR) when given (packaging).
# docs/deploy.md says what to do next. install-files installs from $(BIN) without
# building (the tests use it).
PREFIX ?= /usr/local
DESTDIR ?=
DOC_DIR = $(DESTDIR)$(PREFIX)/share/doc/edge-outbox
install: dist
	@$(MAKE) --no-print-directory install-files BIN='$(DIST_BIN)'

install-files:
	@case "$(PREFIX)$(DESTDIR)" in *[[:space:]\|\&\']*) echo "install: PREFIX and DESTDIR must hold no spaces, |, & or quotes"; exit 1;; esac
	@for b in user-service transaction-service edge-outbox; do \
		[ -x "$(BIN)/$$b" ] || { echo "install: $(BIN)/$$b is missing: run make build (or make dist, with BIN=its folder) first"; exit 1; }; \
		install -D -m 0755 "$(BIN)/$$b" "$(DESTDIR)$(PREFIX)/bin/$$b" || exit 1; \
	done
	@for u in deploy/systemd/*.service; do \
		tmp=$$(mktemp) && sed 's|/usr/local/|$(PREFIX)/|g' "$$u" > "$$tmp" \
			&& install -D -m 0644 "$$tmp" "$(DESTDIR)/etc/systemd/system/$$(basename "$$u")" \
			|| { rm -f "$$tmp"; exit 1; }; rm -f "$$tmp"; \
	done
	@install -D -m 0644 deploy/systemd/edge-outbox.env.example "$(DOC_DIR)/edge-outbox.env.example"
	@install -D -m 0644 mosquitto.conf "$(DOC_DIR)/mosquitto.conf"
	@for f in alerts.yml prometheus.yml.example; do install -D -m 0644 "deploy/prometheus/$$f" "$(DOC_DIR)/prometheus/$$f" || exit 1; done
	@install -D -m 0644 README.md "$(DOC_DIR)/README.md"
	@for d in docs/*.md; do install -D -m 0644 "$$d" "$(DOC_DIR)/$$d" || exit 1; done
	@echo "installed into $(DESTDIR)$(PREFIX) and $(DESTDIR)/etc/systemd/system; next: docs/deploy.md"

# Mosquitto started as root drops to the mosquitto user, which must own its
# persistence folder.
run-all: deps build
	@mkdir -p data/mosquitto
	@if [ "$$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto data/mosquitto; fi
	@PATH="$$PATH:/usr/sbin" "$(BIN)/edge-outbox" run-all

# Runs a box of its own on free ports (data in data/demo-offline); needs no run-all.
demo-offline: deps build
	@PATH="$$PATH:/usr/sbin" "$(BIN)/edge-outbox" demo-offline

# A 3-node NATS cluster of its own (data in data/cluster-demo); as root, each service
# on a network namespace of its own. Installs nats-server with apt-get when missing.
cluster-demo: deps build nats-deps
	@PATH="$$PATH:/usr/sbin" "$(BIN)/edge-outbox" cluster-demo

# Needs root and loop devices for MODE=power (it says SKIPPED otherwise).
power-cut: deps build
	@PATH="$$PATH:/usr/sbin:/sbin" "$(BIN)/edge-outbox" power-cut --cycles $(CYCLES) --mode $(MODE)

# Quick mode takes about 3 minutes; BENCH=full runs 100,000 events per figure;
# BENCH=scale the cost as the work grows (docs/performance.md, "Scale").
bench: deps
	BENCH=$(BENCH) $(CARGO) bench --locked -p edge-box --bench box

watch:
	@$(as_observer); mosquitto_sub -h 127.0.0.1 -p 1883 -v -t 'edge-outbox/events/#'

verify:
	@[ -x "$(BIN)/edge-outbox" ] || $(CARGO) build --release --locked
	"$(BIN)/edge-outbox" verify

demo:
	@set -euo pipefail; \
	step() { printf '\n\033[1m%s\033[0m\n' "$$*"; }; \
	curl -sf $(USERS)/healthz >/dev/null && curl -sf $(LEDGER)/healthz >/dev/null \
		|| { echo "the box is not running: start it with 'make run-all' in another terminal"; exit 1; }; \
	$(as_observer); \
	sub=$$(mktemp); \
	mosquitto_sub -h 127.0.0.1 -p 1883 -v -C 2 -W 10 -t 'edge-outbox/events/#' > "$$sub" & subpid=$$!; \
	sleep 0.3; \
	email="demo-$$(date +%s%N)@example.com"; \
	step "1. POST /users: user-service writes the user and a user.created event in one transaction"; \
	echo "curl -X POST $(USERS)/users -d '{\"name\":\"Demo User\",\"email\":\"$$email\"}'"; \
	user=$$(curl -sS -X POST $(USERS)/users -H 'Content-Type: application/json' -H "Idempotency-Key: $$email" \
		-d "{\"name\":\"Demo User\",\"email\":\"$$email\"}"); \
	echo "$$user"; \
	id=$$(sed -n 's/.*"id":"\([0-9a-f-]*\)".*/\1/p' <<< "$$user"); \
	step "2. The outbox row (GET /outbox/events?order=desc&limit=1): pending until the broker's PUBACK, then published"; \
	curl -sS "$(USERS)/outbox/events?order=desc&limit=1"; echo; \
	step "3. The events on the broker (mosquitto_sub): user.created, then transaction-service's transaction.created"; \
	wait $$subpid || true; cat "$$sub"; rm -f "$$sub"; \
	step "4. transaction-service applied user.created once and granted the welcome credit (GET /transactions?user_id=$$id)"; \
	for i in $$(seq 50); do t=$$(curl -sS "$(LEDGER)/transactions?user_id=$$id"); grep -q '"welcome":true' <<< "$$t" && break; sleep 0.1; done; \
	echo "$$t"; \
	step "5. user-service applied transaction.created once: the balance (GET /users/$$id)"; \
	for i in $$(seq 50); do u=$$(curl -sS $(USERS)/users/$$id); grep -q '"balance_cents":0,' <<< "$$u" || break; sleep 0.1; done; \
	echo "$$u"; \
	step "6. Status of both outboxes and consumers (GET /outbox)"; \
	curl -sS $(USERS)/outbox; echo; curl -sS $(LEDGER)/outbox; echo

# cargo-nextest runs each test in its own process; plain cargo test works too. Both
# cover the library and the box (the workspace's default members), and build
# examples/embed.rs, which tests/example.rs runs against a real Mosquitto.
# PI=0 leaves the Raspberry Pi build out (its test says SKIPPED); CI builds it.
PI ?= 1
test: deps fuzz-deps prometheus-deps nats-deps $(if $(filter 0,$(PI)),,pi)
	@export SCHEMATHESIS="$$(realpath "$(FUZZ_VENV)/bin/st")"; \
	if [ "$(PI)" != 0 ]; then export PI_BIN="$$(realpath '$(PI_BIN)')"; fi; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --workspace --no-fail-fast; \
	else \
		$(CARGO) test --locked --workspace --no-fail-fast; \
	fi
	@$(MAKE) --no-print-directory test-docs check-deps check-alerts

# The alert rules parse and fire when their unit tests say they do.
# The example scrape config is checked with the rules where it expects them.
check-alerts:
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT \
		&& cp deploy/prometheus/alerts.yml "$$tmp/edge-outbox-alerts.yml" \
		&& sed "s|/etc/prometheus/|$$tmp/|" deploy/prometheus/prometheus.yml.example > "$$tmp/prometheus.yml" \
		&& promtool check config "$$tmp/prometheus.yml"

# The library's doc examples compile and run; its docs build without a warning
# (broken links, missing docs).
test-docs:
	$(CARGO) test --locked -p edge-outbox --doc
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps -p edge-outbox

# A program that embeds the library must not compile the box's HTTP stack.
check-deps:
	@tree=$$($(CARGO) tree --locked -p edge-outbox -e normal --prefix none) || { echo "check-deps: cargo tree failed"; exit 1; }; \
	bad=$$(sed 's/ .*//' <<< "$$tree" | grep -E '^(axum|hyper|tower|ureq|edge-box)(-|$$)' | sort -u); \
	if [ -n "$$bad" ]; then echo "edge-outbox must not depend on: $$bad (cargo tree -p edge-outbox -e normal -i <crate> shows why)"; exit 1; fi; \
	echo "check-deps: edge-outbox depends on none of axum, hyper, tower, ureq"

clean:
	$(CARGO) clean
	rm -rf data
