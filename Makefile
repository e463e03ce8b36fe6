# One command to set up and serve, one to test.  See README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup serve serve-secure test test-fast lint proto lock clean

# Installs exactly the lock (requirements/dev.txt, hash-checked): uv first, with pip,
# from its own locked entry; then uv installs the rest and the project itself.
UV := $(BIN)/uv
UV_PIP = $(UV) pip --quiet
$(STAMP): requirements/dev.txt requirements/uv.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	$(UV_PIP) sync --python $(BIN)/python --require-hashes requirements/dev.txt
	$(UV_PIP) install --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

## setup: create the virtual environment, install, build and verify the models
setup: $(STAMP)
	$(BIN)/faceverify models build

## serve: set everything up, then run the server on the embedded defaults
##        (gRPC on 50051, Prometheus metrics on 9464; plaintext on localhost,
##        for development: see docs/security.md)
FACEVERIFY_METRICS_PORT ?= 9464
serve: setup
	FACEVERIFY_METRICS_PORT=$(FACEVERIFY_METRICS_PORT) $(BIN)/faceverify serve --insecure

## serve-secure: the same with mutual TLS on 50051, TLS for API-key clients on
##        50053, and an access policy, from development certificates made once in
##        .secure/ (`faceverify access certs`); see docs/security.md
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
	$(BIN)/ruff check server index tests benchmarks loadtest proto requirements
	$(BIN)/mypy server index

## lock: resolve the dependencies again into requirements/ (ARGS=--upgrade for the
##        newest allowed releases), install them, and regenerate server/gen with the
##        locked grpcio-tools
lock: $(STAMP)
	$(BIN)/python requirements/lock.py $(ARGS)
	$(MAKE) proto

## proto: regenerate server/gen, proto/faceverify.protoset and docs/api-reference.md
##        from proto/
proto: $(STAMP)
	$(BIN)/python proto/generate.py
	$(BIN)/python proto/reference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
