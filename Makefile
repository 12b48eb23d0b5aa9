# make demo          : venv, demo data, paired dataset, CPU-sized training, harmonized test volumes with metrics
#                      beside Nyul and N4 + Nyul fitted on the training subjects' Philips scans (demo/target)
# make demo-unpaired : the same demo data split so that the two vendors' training subjects are disjoint
# make test          : venv, then the fast tests (everything but the tests marked slow: training runs and processes)
# make test-all      : venv, then every test (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := demo
EXP    := demo
TRAIN_MINUTES ?= 7
UNPAIRED_MINUTES ?= 10

.PHONY: venv test test-all demo demo-unpaired bench quality clean-demo

# The project is installed in editable mode (pyproject.toml), so every script imports the repository's code
# from any folder. The marker is written only after a complete install, so a half-built venv is completed
# on the next run.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -m "not slow"

test-all: venv
	$(PY) -m pytest -q

$(DEMO)/nifti/.complete: | venv
	$(PY) dataset/make_demo_data.py --output_dir $(DEMO)/nifti --subjects 12 --overwrite
	touch $@

demo: venv $(DEMO)/nifti/.complete
	$(PY) dataset/generate_paired_dataset.py --vendor1_dir $(DEMO)/nifti/SIEMENS --vendor2_dir $(DEMO)/nifti/Philips \
		--output_dir $(DEMO)/dataset --split_ratio 0.8 --test_ratio 0.2 --overwrite
	$(PY) train.py @recipes/cpu.args -ex $(EXP) --data_root $(DEMO)/dataset --max_minutes $(TRAIN_MINUTES) --overwrite
	$(PY) -c "import json, os, shutil; info = json.load(open('$(DEMO)/dataset/dataset_info.json')); \
		shutil.rmtree('$(DEMO)/target', ignore_errors=True); os.makedirs('$(DEMO)/target'); \
		[shutil.copy('$(DEMO)/nifti/Philips/' + s + '.nii.gz', '$(DEMO)/target') for s in info['subjects']['trainset']]"
	$(PY) inference_nii.py --experiment $(EXP) --epoch latest --src_vendor SIEMENS --trg_vendor Philips \
		--input_dir $(DEMO)/dataset/testset/SIEMENS --reference_dir $(DEMO)/dataset/testset/Philips \
		--target_dir $(DEMO)/target --output_dir results/$(EXP)/testset/SIEMENS_to_Philips --overwrite
	@echo
	@echo "loss curves:   results/$(EXP)/loss/loss.png"
	@echo "sample grid:   $$(ls -d results/$(EXP)/sample/epoch_*/iter_0.png | sort -V | tail -n 1)"
	@echo "previews:      $$(ls results/$(EXP)/testset/SIEMENS_to_Philips/previews/*.png | tr '\n' ' ')"
	@echo "metrics table: results/$(EXP)/testset/SIEMENS_to_Philips/metrics.csv"

# SIEMENS scans of subjects 1-5, Philips scans of subjects 6-10 (no subject on both), and two traveling subjects
# (11, 12) held out, scanned on both: the test.
UNPAIRED := $(DEMO)/unpaired
$(UNPAIRED)/.complete: $(DEMO)/nifti/.complete
	$(PY) dataset/split_demo.py --mode unpaired --input_dir $(DEMO)/nifti --output_dir $(UNPAIRED) --overwrite
	touch $@

demo-unpaired: venv $(UNPAIRED)/.complete
	$(PY) dataset/generate_paired_dataset.py --vendor1_dir $(UNPAIRED)/SIEMENS --vendor2_dir $(UNPAIRED)/Philips \
		--output_dir $(UNPAIRED)/dataset --split_ratio 0.8 --overwrite
	$(PY) train.py @recipes/cpu_unpaired.args -ex $(EXP)-unpaired --data_root $(UNPAIRED)/dataset \
		--max_minutes $(UNPAIRED_MINUTES) --overwrite
	$(PY) inference_nii.py --experiment $(EXP)-unpaired --epoch latest --src_vendor SIEMENS --trg_vendor Philips \
		--input_dir $(UNPAIRED)/traveling/SIEMENS --reference_dir $(UNPAIRED)/traveling/Philips \
		--target_dir $(UNPAIRED)/Philips --output_dir results/$(EXP)-unpaired/testset/SIEMENS_to_Philips --overwrite

bench: venv
	$(PY) benchmarks/benchmark.py --quick

quality: venv $(DEMO)/nifti/.complete
	$(PY) experiments/quality.py --data_dir $(DEMO)/nifti --minutes 10 @recipes/cpu.args

clean-demo:
	rm -rf $(DEMO) results/$(EXP) results/$(EXP)-unpaired
