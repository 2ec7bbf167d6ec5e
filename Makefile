# Convenience wrappers; the scripts are the source of truth (a fresh Debian
# may not have make, so the README uses the scripts directly).
.PHONY: setup test demo lint bench
setup:
	./scripts/setup.sh
test:
	./scripts/test.sh
demo:
	./scripts/demo.sh
lint:
	.venv/bin/ruff check ctxdp tests bench
bench:
	CTXDP_EXTRAS=test,bench ./scripts/setup.sh
	.venv/bin/python bench/conntrack.py
	.venv/bin/python bench/offload.py
	.venv/bin/python bench/xdp_cost.py
