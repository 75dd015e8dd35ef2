# Benchmarks: the engine against Postfix on loopback (see bench/README.md).
#
#   make bench          full run: installs Postfix when missing (apt-get), every scenario
#                       3 times, engine and Postfix alternating; writes bench/results/<date>.md
#                       and .json and updates bench/RESULTS.md. Exit 1 if any run lost or
#                       duplicated mail.
#   make bench-quick    one tiny run of each scenario (200 messages); Postfix only if it is
#                       already installed; exit 1 on any count mismatch.
#
# Extra options go in BENCH_ARGS, e.g.  make bench BENCH_ARGS="--n 10000 --backlog-n 10000"
# (python3 -m bench --help lists them all).

PYTHON ?= python3
BENCH_ARGS ?=

.PHONY: bench bench-quick

bench:
	$(PYTHON) -m bench --install-postfix --profile --invoked-as "make bench" $(BENCH_ARGS)

bench-quick:
	$(PYTHON) -m bench --quick --invoked-as "make bench-quick" $(BENCH_ARGS)
