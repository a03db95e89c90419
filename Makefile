# backchannel: `make demo` and `make test` are all a fresh machine needs (Python 3.11+).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv gen demo test lint typecheck unit zookeeper bench mutate clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "backchannel needs Python 3.11+; run make PY=python3.11 ...")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# regenerate the protobuf modules from protos/ (they are committed; `make test` checks drift)
gen: venv
	$(BIN)/python scripts/gen_protos.py

demo: venv gen
	$(BIN)/python examples/demo.py

lint: venv
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layers and no cycles: [tool.importlinter] in pyproject.toml

# src/ under mypy --strict; then the typed example (docs/typing.md): its generated stub up
# to date, and both type checkers an app of backchannel's is promised to pass
typecheck: venv
	$(BIN)/mypy
	$(BIN)/backchannel stubs --check examples/typed/prices.py
	$(BIN)/mypy --strict examples/typed
	$(BIN)/basedpyright --pythonpath $(BIN)/python examples/typed

# the registry tests run a real ZooKeeper: Debian's package, installed here when we can
ZOOKEEPER_JAR := /usr/share/java/zookeeper.jar
zookeeper:
	@test -f $(ZOOKEEPER_JAR) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q zookeeper >/dev/null; }; } && \
	  test -f $(ZOOKEEPER_JAR); } || \
	  { echo "the tests need ZooKeeper: install Debian's zookeeper package (apt-get install zookeeper) as root"; exit 1; }

# the Node.js consumer example (examples/node/) runs in the tests, against a Python
# provider, so the wire is proven language-neutral: Debian's nodejs and npm, installed here
# when we can, and the example's packages from its package-lock.json (npm ci)
.PHONY: node
NODE_LOCK := examples/node/node_modules/.package-lock.json
node:
	@{ command -v node >/dev/null && command -v npm >/dev/null; } || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null; }; } && \
	  command -v node >/dev/null && command -v npm >/dev/null; } || \
	  { echo "the tests run a Node.js consumer: install Debian's nodejs and npm packages (apt-get install nodejs npm) as root"; exit 1; }
	@test $(NODE_LOCK) -nt examples/node/package-lock.json || \
	  { cd examples/node && npm ci --no-audit --no-fund --prefer-offline; }

unit: venv zookeeper node
	$(BIN)/pytest

test: lint typecheck unit

bench: venv
	$(BIN)/python bench/run.py
	$(BIN)/python bench/peers.py
	$(BIN)/python bench/bulk.py
	$(BIN)/python bench/loadbalance.py
	$(BIN)/python bench/loop_turns.py

# mutation testing of the core (docs/testing.md), never part of `make test`; the modules and
# tests are [tool.mutmut] in pyproject.toml. MUTANTS narrows the run, e.g.
# make mutate MUTANTS='backchannel.cluster.loadbalance*'
MUTANTS ?=
MUTATE_STAMP := $(VENV)/.installed-mutate
$(MUTATE_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,mutate]'
	touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	$(BIN)/mutmut run $(if $(MUTANTS),'$(MUTANTS)')
	$(BIN)/python scripts/mutation_report.py

clean:
	rm -rf mutants $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
