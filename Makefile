# lirpa-patch: two commands do everything on a fresh machine.
#   make demo   install, then certify the bundled MNIST 2x2 model on 100 bundled MNIST test digits
#               (JSON report demo_report.json, HTML report with heatmaps demo_report.html)
#   make test   install, then run the test suite (.ci/run calls this)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"
	# auto_LiRPA 0.3's metadata pins torch<1.13 (uninstallable on Python 3.11): install it
	# without its pins; its real runtime needs are declared in pyproject.toml.
	$(BIN)/pip install --no-deps "auto-LiRPA==0.3"
	touch $(STAMP)

demo: install
	$(BIN)/lirpa-patch certify onnx_models/mnist_mlp_2x2.onnx --patch 2x2 --data sample \
		--num 100 --threads 1 --output demo_report.json --html demo_report.html

test: install
	$(BIN)/python -m pytest -q -n 2

test-all: install
	$(BIN)/python -m pytest -q -n 2 --runslow

docs: install
	$(BIN)/pip install "pdoc>=14"
	$(BIN)/python docs/build.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_report.json demo_report.html
