# Two commands on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast tiny clean

setup:
	bash scripts/setup_env.sh

demo: setup
	$(PY) -m vllm_affinity_tools.demo

test: setup
	$(PY) -m pytest tests

# pooling/config/CLI only: no engine, seconds
test-fast: setup
	$(PY) -m pytest tests -m "not engine and not server"

tiny: setup
	$(PY) -m vllm_affinity_tools.tiny .cache/tiny-qwen2-audio

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
