# transfgu-dist developer entry points.
#   make venv   create/update .venv (only reinstalls when pyproject.toml or the pins change)
#   make lint   ruff (lint + format check) in .venv
#   make test   run the test suite in .venv
#   make demo   run the whole pipeline locally (jobs/run_all.py) in .venv; extra args: ARGS=...

SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python

# Installed in the SAME pip command as the project so pip never picks another torch build
# (plain `torch` from PyPI is a multi-GB CUDA build; these two lie on this machine's disk and
# are the newest the local pip constraint allows).  mlflow 3.18.0 does not resolve on this
# registry (its mlflow-skinny==3.18.0 is missing), hence the pin.  Override on other hosts,
# e.g. `make venv PINS="torch==2.9.1 torchvision==0.24.1 mlflow==3.17.2"` on aarch64.
PINS ?= torch==2.14.1 torchvision==0.29.1 mlflow==3.17.2
EXTRAS ?= dev
PIP_FLAGS ?= --progress-bar off

# The stamp's name carries a hash of everything that decides what gets installed, so a
# changed pyproject.toml / pin set reinstalls, and an unchanged one is a no-op (mtimes from
# a fresh clone or checkout do not matter).
VENV_HASH := $(shell { cat pyproject.toml; echo '$(PINS) $(EXTRAS)'; } | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(VENV_HASH)

.PHONY: venv test lint demo

venv: $(STAMP)

# uv resolves and installs the same set as pip, about 3x faster (CI builds this venv on every run); it is handed
# pip's own index settings (find-links, extra indexes, constraints) so it sees the same wheels, and compiles the
# bytecode as pip does (with PYTHONDONTWRITEBYTECODE set, every Ray worker would otherwise recompile torch and ray
# from source).  pip is the fallback.
export PIP_TO_UV := import subprocess, sys; flags = {"find-links": "--find-links", "index-url": "--index-url", \
  "extra-index-url": "--extra-index-url", "constraint": "--constraint"}; \
  out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout; \
  pairs = [(k.rsplit(".", 1)[-1], v.strip("'\"")) for k, _, v in (l.partition("=") for l in out.splitlines())]; \
  print(" ".join(f"{flags[k]} {u}" for k, v in pairs if k in flags for u in v.split()))

$(STAMP):
	@test -x $(VPY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	{ $(VPY) -m pip install -q $(PIP_FLAGS) uv && UV_LINK_MODE=copy $(VENV)/bin/uv pip install -p $(VPY) \
	    --index-strategy unsafe-best-match --compile-bytecode $$($(VPY) -c "$$PIP_TO_UV") $(PINS) -e '.[$(EXTRAS)]'; } \
	  || $(VPY) -m pip install $(PIP_FLAGS) $(PINS) -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv
	$(VPY) -m pytest -q

demo: venv
	$(VPY) jobs/run_all.py $(ARGS)
