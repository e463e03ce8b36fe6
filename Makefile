# One command to set up and serve, one to test.  See README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup serve serve-secure test test-fast lint proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## setup: create the virtual environment, install, build and verify the models
setup: $(STAMP)
	$(BIN)/faceverify models build

## serve: set everything up, then run the server on the embedded defaults
##        (gRPC on 50051, Prometheus metrics on 9464; plaintext on localhost,
##        for development: see README "Running it securely")
FACEVERIFY_METRICS_PORT ?= 9464
serve: setup
	FACEVERIFY_METRICS_PORT=$(FACEVERIFY_METRICS_PORT) $(BIN)/faceverify serve --insecure

## serve-secure: the same with mutual TLS on 50051, TLS for API-key clients on
##        50053, and an access policy, from development certificates made once in
##        .secure/ (`faceverify access certs`); see README "Running it securely"
SECURE_DIR ?= .secure
serve-secure: setup
	test -f $(SECURE_DIR)/server.crt || \
	  $(BIN)/faceverify access certs --out $(SECURE_DIR) --client admin.local
	FACEVERIFY_METRICS_PORT=$(FACEVERIFY_METRICS_PORT) $(BIN)/faceverify serve \
	  --tls-cert $(SECURE_DIR)/server.crt --tls-key $(SECURE_DIR)/server.key \
	  --tls-client-ca $(SECURE_DIR)/faceverify-dev-ca.pem --api-key-port 50053 \
	  --access-policy $(SECURE_DIR)/policy.json

## test: set everything up, then run the test suite (what CI runs)
test: setup
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m fast

lint: $(STAMP)
	$(BIN)/ruff check server index tests benchmarks loadtest proto
	$(BIN)/mypy server index

## proto: regenerate server/gen from proto/
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
