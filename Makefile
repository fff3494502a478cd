# edge-outbox: see README.md. `make help` lists the targets.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help build test deps clean

help:
	@echo "make test    install Mosquitto when missing, then run every test against a real broker"
	@echo "make build   build in release mode"
	@echo "make clean   remove build output and ./data"

# Mosquitto and its clients: the tests start their own broker processes.
deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null 2>&1; then \
		echo "installing mosquitto and mosquitto-clients"; \
		$(SUDO) apt-get install -y mosquitto mosquitto-clients || { $(SUDO) apt-get update && $(SUDO) apt-get install -y mosquitto mosquitto-clients; }; \
	fi

build:
	$(CARGO) build --release --locked

# cargo-nextest runs each test in its own process; plain cargo test works too.
test: deps
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		$(CARGO) test --locked --no-fail-fast; \
	fi

clean:
	$(CARGO) clean
	rm -rf data
