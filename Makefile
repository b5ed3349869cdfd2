.PHONY: setup test demo lint assets bench

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy src

assets: setup
	.venv/bin/virtc assets build

bench: setup
	.venv/bin/python benchmarks/run_all.py
