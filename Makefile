# The two fresh-machine entry points: `make demo` and `make test`.
VENV := .venv
STAMP := $(VENV)/.lafid-installed

$(STAMP): pyproject.toml requirements-nodeps.txt scripts/setup.sh
	scripts/setup.sh
	touch $(STAMP)

.PHONY: setup demo test bench
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lafid demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/curate_throughput.py
