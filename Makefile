# The two commands the README promises: `make demo` and `make test`. Both set
# up what a fresh machine lacks (Debian packages, Python environments), build
# the extension and run.

PYTHON ?= python3
DJANGO_VERSIONS := 4.2 5.2
VENV := .venv
MAIN_VENV := $(VENV)/django-5.2
WHEELS := target/wheels
STAMP := .ready

.PHONY: demo test lint rust-test py-test bench bench-failover bench-http bench-network \
	bench-patroni system-deps wheel clean fuzz fuzz-ci fuzz-deps
.DELETE_ON_ERROR:

demo: system-deps $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python demo/demo.py

test: system-deps lint rust-test py-test fuzz-ci

system-deps:
	tools/install-system-deps.sh

# One virtualenv per supported Django version, with the freshly built wheel.
$(VENV)/django-%/$(STAMP): requirements/dev.txt wheel
	test -x $(VENV)/django-$*/bin/python || $(PYTHON) -m venv $(VENV)/django-$*
	$(VENV)/django-$*/bin/pip install -q --disable-pip-version-check -r requirements/dev.txt "Django~=$*.0"
	$(VENV)/django-$*/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps $(WHEELS)/*.whl
	touch $@

# The wheel is abi3: one build serves every environment.
wheel: $(MAIN_VENV)/bin/maturin
	rm -rf $(WHEELS)
	$(MAIN_VENV)/bin/maturin build --release --out $(WHEELS)

$(MAIN_VENV)/bin/maturin:
	test -x $(MAIN_VENV)/bin/python || $(PYTHON) -m venv $(MAIN_VENV)
	$(MAIN_VENV)/bin/pip install -q --disable-pip-version-check "maturin>=1.9.4,<2"

lint: $(MAIN_VENV)/$(STAMP)
	cargo fmt --check
	rustfmt --check --edition 2021 fuzz/src/lib.rs fuzz/targets/*.rs
	cargo clippy --all-targets -- -D warnings
	$(MAIN_VENV)/bin/ruff check python tests tools benches demo examples fuzz
	$(MAIN_VENV)/bin/ruff format --check python tests tools benches demo examples fuzz
	$(MAIN_VENV)/bin/mypy python/dbha
	$(MAIN_VENV)/bin/python -m mypy.stubtest dbha._core --allowlist stubtest-allowlist.txt

rust-test:
	cargo test

py-test: $(foreach v,$(DJANGO_VERSIONS),$(VENV)/django-$(v)/$(STAMP))
	set -e; for v in $(DJANGO_VERSIONS); do \
		echo "== pytest, Django $$v"; \
		$(VENV)/django-$$v/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS); \
	done

bench: $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python benches/hot_path.py

bench-failover: system-deps $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python benches/failover.py

bench-http: system-deps $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python benches/http_failover.py

# Needs root: network namespaces.
bench-network: system-deps $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python benches/network_faults.py

bench-patroni: system-deps $(MAIN_VENV)/$(STAMP)
	$(MAIN_VENV)/bin/python benches/patroni.py

# Coverage-guided fuzzing (AFL++ via cargo-afl) of every parser of server
# bytes, one target at a time: 10 M executions each (about 20 minutes a
# target), or in CI about 10 s each. Non-zero on any crash or hang.
fuzz: fuzz-deps
	$(PYTHON) fuzz/run.py --execs 10000000

fuzz-ci: fuzz-deps
	$(PYTHON) fuzz/run.py --seconds 10

fuzz-deps:
	tools/install-fuzz-deps.sh

clean:
	rm -rf $(VENV) target fuzz/target fuzz/out
