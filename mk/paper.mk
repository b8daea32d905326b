# Paper experiments (docs/method.md section 5). The Makefile includes this file (`-include mk/paper.mk`).
#
#   make paper-data                    prepare dolly, alpaca, sni, dialogsum into $(PAPER_DATA)/<dataset>/
#   make paper-A                       setting A on every dataset: teacher SFT, CoT augmentation by
#                                      that teacher, each base method with and without CoT2Align,
#                                      then the 5-seed evaluation of every run (teacher included)
#   make paper-A PAPER_DATASETS=dolly  one dataset only
#   make paper-all                     every setting (A A_same B B_same C), then the table
#   make paper-table                   $(PAPER_ROOT)/paper_table.md from every eval_results.json
#   make -n paper-A                    print the command sequence without running anything
#
# Layout: $(PAPER_ROOT)/<setting>/<dataset>/<run>/ with <run> = teacher_sft, sft, <method>,
# <method>+cot2align; each run's evaluation is in <run>/eval/eval_results.json. Every step is a
# file target, so rerunning a target after a failure redoes only what is missing (training
# restarts with --resume auto, augmentation resumes its shards).
#
# Hyperparameters live in the recipes (cot2align_ds/configs/paper_<setting>.yaml); this file
# only names settings, methods, datasets and directories.
#
# Variables (override on the command line):
#   PAPER_ROOT, PAPER_DATA     where runs and prepared data go (runs/paper, data)
#   PAPER_DATASETS             datasets to run (dolly alpaca sni dialogsum)
#   PAPER_SOURCE_<dataset>     a local JSON/JSONL copy for `data prepare --source`, e.g.
#                              PAPER_SOURCE_dolly=/data/databricks-dolly-15k.jsonl (default: the hub)
#                              Data you already have: put train/dev/test.jsonl in
#                              $(PAPER_DATA)/<dataset>/ and `touch .../prepare_stats.json`.
#   PAPER_TRAIN                training launcher, followed by the recipe name and `train` args.
#                              Default: launchers/local.sh (every local GPU through DeepSpeed).
#                              One process: PAPER_TRAIN='$(PY) -m cot2align_ds.cli train --config'
#   PAPER_SFT                  teacher fine-tuning launcher, followed by the recipe name. Default:
#                              the deepspeed launcher; one process:
#                              PAPER_SFT='$(PY) -m cot2align_ds.cli sft-teacher --config'
#   PAPER_CACHE                teacher-cache launcher, followed by the recipe name (default: the
#                              deepspeed launcher over every local GPU). Every student that
#                              needs the teacher reads it from a cache (docs/teacher_cache.md):
#                              one per setting and dataset for the plain runs, one for the
#                              CoT2Align runs, each built once and shared by every method.
#   PAPER_ENV                  environment for every command. Downloads are allowed by default
#                              (models and datasets come from the hub); on offline nodes with a
#                              warm cache use PAPER_ENV='$(OFFLINE)'.

ifndef PAPER_MK_INCLUDED
PAPER_MK_INCLUDED := 1
# Wherever this file is included, it never becomes the default goal of a bare `make`.
paper_default_goal := $(.DEFAULT_GOAL)

PAPER_ROOT ?= runs/paper
PAPER_DATA ?= data
PAPER_DATASETS ?= dolly alpaca sni dialogsum
PAPER_SETTINGS := A A_same B B_same C

# Base methods per vocabulary setting (README "Methods"); sft is the student trained alone.
PAPER_METHODS_CROSS ?= sft uld mined dskd_cma
PAPER_METHODS_SAME ?= sft vanilla_kd dskd
PAPER_METHODS_A ?= $(PAPER_METHODS_CROSS)
PAPER_METHODS_A_same ?= $(PAPER_METHODS_SAME)
PAPER_METHODS_B ?= $(PAPER_METHODS_CROSS)
PAPER_METHODS_B_same ?= $(PAPER_METHODS_SAME)
PAPER_METHODS_C ?= $(PAPER_METHODS_CROSS)

PAPER_ENV ?= TOKENIZERS_PARALLELISM=false
PAPER_DEEPSPEED ?= $(dir $(PY))deepspeed
PAPER_CLI ?= $(PAPER_ENV) $(PY) -m cot2align_ds.cli
PAPER_TRAIN ?= $(PAPER_ENV) DEEPSPEED=$(PAPER_DEEPSPEED) launchers/local.sh
PAPER_SFT ?= $(PAPER_ENV) $(PAPER_DEEPSPEED) --module cot2align_ds.cli sft-teacher --config
PAPER_CACHE ?= $(PAPER_ENV) $(PAPER_DEEPSPEED) --module cot2align_ds.cli cache-teacher --config
PAPER_BEST_MODEL ?= $(PY) -m cot2align_ds.experiments.paper_table --best-model
PAPER_EVAL_SEEDS := 10,20,30,40,50

# --- helpers: $(1) setting, $(2) dataset, $(3) run ---------------------------------------------
paper_base = $(subst +cot2align,,$(1))
paper_is_cot = $(findstring +cot2align,$(1))
paper_is_sft = $(filter sft,$(call paper_base,$(1)))
# Every method, and every KD method once more with CoT2Align (it needs a teacher).
paper_runs = $(foreach m,$(1),$(m) $(if $(filter sft,$(m)),,$(m)+cot2align))
paper_dir = $(PAPER_ROOT)/$(1)/$(2)/$(3)
# The best dev checkpoint of the teacher SFT, published by sft-teacher (else its final weights).
paper_teacher = $(call paper_dir,$(1),$(2),teacher_sft)/teacher
paper_cot_file = $(call paper_dir,$(1),$(2),cot)/train_cot.jsonl
paper_data_done = $(PAPER_DATA)/$(1)/prepare_stats.json
# The teacher cache a run reads: one for the plain runs, one for the CoT2Align runs.
paper_cache = $(call paper_dir,$(1),$(2),teacher_cache_$(if $(call paper_is_cot,$(3)),cot,plain))

# Without CoT2Align a run trains on the plain records and no CoT view; with it, on the teacher's
# rationales with the recipe's CoT records.
paper_train_args = $(strip \
  --set output_dir=$(call paper_dir,$(1),$(2),$(3)) \
  --set distill.method=$(call paper_base,$(3)) \
  --set cot2align.enabled=$(if $(call paper_is_cot,$(3)),true,false) \
  --set data.train_file=$(if $(call paper_is_cot,$(3)),$(call paper_cot_file,$(1),$(2)),$(PAPER_DATA)/$(2)/train.jsonl) \
  --set data.dev_file=$(PAPER_DATA)/$(2)/dev.jsonl \
  $(if $(call paper_is_cot,$(3)),,--set data.cot_records=none) \
  $(if $(call paper_is_sft,$(3)),,--set teacher.name_or_path=$(call paper_teacher,$(1),$(2))) \
  $(if $(call paper_is_sft,$(3)),,--set teacher_cache.path=$(call paper_cache,$(1),$(2),$(3))) \
  --set tracking.run_name=paper_$(1)_$(2)_$(3))

# A cache serves every method: it is built with DSKD-CMA, whose layers include every other's.
paper_cache_args = $(subst --set@,--set ,$(filter-out --set@tracking.run_name=% --set@output_dir=%,$(subst --set ,--set@,$(call paper_train_args,$(1),$(2),$(3)))))

paper_train_deps = $(call paper_data_done,$(2)) \
  $(if $(call paper_is_sft,$(3)),,$(call paper_dir,$(1),$(2),teacher_sft)/.done) \
  $(if $(call paper_is_cot,$(3)),$(call paper_cot_file,$(1),$(2))) \
  $(if $(call paper_is_sft,$(3)),,$(call paper_cache,$(1),$(2),$(3))/index.json)

paper_evals = $(foreach d,$(PAPER_DATASETS),$(foreach r,teacher_sft $(call paper_runs,$(PAPER_METHODS_$(1))),$(call paper_dir,$(1),$(d),$(r))/eval/eval_results.json))

# --- rules --------------------------------------------------------------------------------------
# $(1) setting, $(2) dataset: the fine-tuned teacher and its rationales for the training split.
# The teacher learns the standard view only: no CoT records, no CoT2Align (which would need them).
define paper_teacher_rules
$(call paper_dir,$(1),$(2),teacher_sft)/.done: $(call paper_data_done,$(2)) | install
	$(PAPER_SFT) paper_$(1) --output-dir $(call paper_dir,$(1),$(2),teacher_sft) --overwrite \
	  --set data.train_file=$(PAPER_DATA)/$(2)/train.jsonl --set data.dev_file=$(PAPER_DATA)/$(2)/dev.jsonl \
	  --set data.cot_records=none --set cot2align.enabled=false \
	  --set tracking.run_name=paper_$(1)_$(2)_teacher_sft
	touch $$@

$(call paper_cot_file,$(1),$(2)): $(call paper_dir,$(1),$(2),teacher_sft)/.done | install
	$(PAPER_CLI) augment --teacher $(call paper_teacher,$(1),$(2)) \
	  --data $(PAPER_DATA)/$(2)/train.jsonl --output-dir $$(@D)

# The teacher caches: the views, lengths and precision of the plain and of the CoT2Align runs
# (represented by the DSKD-CMA runs), resumable like training.
$(call paper_cache,$(1),$(2),plain)/index.json: $(call paper_dir,$(1),$(2),teacher_sft)/.done | install
	$(PAPER_CACHE) paper_$(1) $(call paper_cache_args,$(1),$(2),dskd_cma)

$(call paper_cache,$(1),$(2),x+cot2align)/index.json: $(call paper_dir,$(1),$(2),teacher_sft)/.done $(call paper_cot_file,$(1),$(2)) | install
	$(PAPER_CACHE) paper_$(1) $(call paper_cache_args,$(1),$(2),dskd_cma+cot2align)
endef

# $(1) setting, $(2) dataset, $(3) run: one student. `.done` is written only when training
# succeeded, so a failed run is retried (from its newest checkpoint if it saved any).
define paper_run_rules
$(call paper_dir,$(1),$(2),$(3))/.done: $(call paper_train_deps,$(1),$(2),$(3)) | install
	$(PAPER_TRAIN) paper_$(1) --resume auto $(call paper_train_args,$(1),$(2),$(3))
	touch $$@
endef

$(foreach s,$(PAPER_SETTINGS),$(foreach d,$(PAPER_DATASETS),\
  $(eval $(call paper_teacher_rules,$(s),$(d)))\
  $(foreach r,$(call paper_runs,$(PAPER_METHODS_$(s))),$(eval $(call paper_run_rules,$(s),$(d),$(r))))))

$(PAPER_DATA)/%/prepare_stats.json: | install
	$(strip $(PAPER_CLI) data prepare $* --output-dir $(@D) $(if $(PAPER_SOURCE_$*),--source $(PAPER_SOURCE_$*)))

# Standard prompts, sampling with the paper's five seeds, on the dataset's test split; the model
# is the run's best dev checkpoint (else its final weights).
$(PAPER_ROOT)/%/eval/eval_results.json: $(PAPER_ROOT)/%/.done | install
	model=$$($(PAPER_BEST_MODEL) $(PAPER_ROOT)/$*) && \
	$(PAPER_CLI) eval --model "$$model" --data $(PAPER_DATA)/$(word 2,$(subst /, ,$*))/test.jsonl \
	  --output-dir $(@D) --template alpaca --seeds $(PAPER_EVAL_SEEDS)

.PHONY: paper-data paper-all paper-table $(addprefix paper-,$(PAPER_SETTINGS))

paper-data: $(foreach d,$(PAPER_DATASETS),$(call paper_data_done,$(d)))

$(foreach s,$(PAPER_SETTINGS),$(eval paper-$(s): $(call paper_evals,$(s))))

paper-all: $(addprefix paper-,$(PAPER_SETTINGS))
	$(OFFLINE) $(PY) -m cot2align_ds.experiments.paper_table $(PAPER_ROOT)

paper-table: install
	$(OFFLINE) $(PY) -m cot2align_ds.experiments.paper_table $(PAPER_ROOT)

.DEFAULT_GOAL := $(paper_default_goal)
endif
