# The small reasoning benchmark. The Makefile includes this file
# (`-include mk/reproduce.mk`) and provides PY, OFFLINE and the `install` target.
#
#   make reproduce-small         the full grid: every cell x 5 seeds, two runs at a time on
#                                one thread each, as the published grid ran (wall time in
#                                docs/reasoning_bench.md; resumes where a stopped run stopped).
#                                REPRODUCE_JOBS=1: one run at a time on every thread (other
#                                float sums, so per-seed scores differ from the published grid's)
#   make reproduce-teacher-time  after it: the grid's teacher time with and without the cache
#   make reproduce-publish       after them: write the grid into docs/reasoning_bench.md
#   make reproduce-small-quick   the same pipeline, tiny sizes and 2 seeds (~1-2 min)
#   make reproduce-probes        single-seed diagnostics of the full grid (reasoning_bench.PROBES)
#   make reproduce-rationale     the rationale question at twice the grid's steps: probes sft_2x
#                                and sft_cot_2x on the grid's five seeds, paired
#
# Results: $(REPRODUCE_ROOT)/results.md (table), results.png (plot), results.json (with wall
# time), and one run directory per cell and seed under cells/<cell>/seed<N>/.

ifndef REPRODUCE_MK_INCLUDED
REPRODUCE_MK_INCLUDED := 1
# Wherever this file is included, it never becomes the default goal of a bare `make`.
reproduce_default_goal := $(.DEFAULT_GOAL)

REPRODUCE_ROOT ?= runs/reasoning_bench
REPRODUCE_QUICK_ROOT ?= runs/reasoning_bench-quick
REPRODUCE_JOBS ?= 2

.PHONY: reproduce-small reproduce-small-quick reproduce-probes reproduce-teacher-time \
	reproduce-publish reproduce-rationale

reproduce-small: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_ROOT) \
		--jobs $(REPRODUCE_JOBS)

# Single-seed diagnostics (reasoning_bench.PROBES) on the data, teacher and rationales of
# $(REPRODUCE_ROOT); builds them first when `make reproduce-small` has not run.
reproduce-probes: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_ROOT) --probes

# Reasoning first against answers only at twice the grid's steps, on the grid's five seeds.
reproduce-rationale: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_ROOT) --probes \
		--probe sft_2x --probe sft_cot_2x --seed 11 --seed 22 --seed 33 --seed 44 --seed 55

# What the teacher costs the grid of $(REPRODUCE_ROOT), live against its caches.
reproduce-teacher-time: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_ROOT) --teacher-time

# The grid's tables, plot, cost and teacher time into the docs page, between its markers.
reproduce-publish: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_ROOT) \
		--publish docs/reasoning_bench.md

reproduce-small-quick: install
	$(OFFLINE) $(PY) -m cot2align_ds.cli reasoning-bench --output-dir $(REPRODUCE_QUICK_ROOT) --quick

.DEFAULT_GOAL := $(reproduce_default_goal)
endif
