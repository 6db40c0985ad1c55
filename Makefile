# Two commands set everything up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-allreduce test test-portability lint format env clean

$(STAMP): pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -c requirements.txt -e ".[dev,mpi,vision,plot]"
	touch $(STAMP)

env: $(STAMP)

# The demo: a GPT trained on the standard library's bytes by commlab's DataParallel on 4 gloo ranks,
# then the simulated allreduce algorithms on two 8-GPU H100 nodes.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 4 examples/ddp.py
	$(BIN)/commlab sim collective --topology cluster:nodes=2,gpu=h100,nic=ndr --op allreduce --size 1M,64M,1G

demo-allreduce: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 4 examples/allreduce.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The numerics tests under every CPU kernel path this machine has, the timing tests with every core busy.
test-portability: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m tests.portability

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
