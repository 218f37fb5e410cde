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

# Two pytest workers, one per core of the 2-core machines the project is tested on (a third made it slower).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup

demo: $(STAMP)
	$(VENV)/bin/resist-det demo

clean:
	rm -rf $(VENV) runs .pytest_cache
