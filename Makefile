# One-command set-up: `make demo` (install + the demo) and `make test` (install + the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers: most tests spend much of their time waiting (rendezvous, timeouts, shaped
# links, one rank evaluating while the other waits), so two at once fill the cores.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

demo: $(STAMP)
	$(VENV)/bin/resist-det demo

clean:
	rm -rf $(VENV) runs .pytest_cache
