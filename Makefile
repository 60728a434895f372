# Two entry points (see README): `make demo` and `make test`. Both set up first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test lint fixtures

# torch is pinned and installed first, on its own: an unpinned torch would pull CUDA builds. The
# rest installs within constraints.txt, the exact set the tests run against.
setup:
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[onnx,dev,plot]"

demo: setup
	bash scripts/demo.sh

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check d2export tests fixtures bench scripts

fixtures:
	$(PYTHON) fixtures/build.py --demo
