# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
PY := .venv/bin/python
INSTALLED := .venv/.requirements-installed
NP ?= 2
DEMO_DATA ?= data/shapes
DEMO_OUT ?= output/demo

.PHONY: install demo test test-fast bench docker-test multihost-test gpu-image gpu-check clean

install: $(INSTALLED)
	@echo "== Horovod: built from source the first time (about 2.5 min), later reused (seconds)"
	PYTHON=$(PY) scripts/install_horovod.sh

$(INSTALLED): requirements.txt pyproject.toml
	@echo "== .venv: installing requirements.txt, about 6 GB with torch's CUDA libraries (about 3.5 min, mostly downloads)"
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

DEMO_DATA_OVERRIDES = data.train.images=$(DEMO_DATA)/train data.val.images=$(DEMO_DATA)/val \
	data.train.annotations=$(DEMO_DATA)/annotations/instances_train.json \
	data.val.annotations=$(DEMO_DATA)/annotations/instances_val.json

demo: install
	@echo "== demo 1/3: generating the shapes dataset in $(DEMO_DATA) (600 + 100 images, about 10 s)"
	$(PY) -m hvd_megdet.data.synthetic --out $(DEMO_DATA)
	@echo "== demo 2/3: training 600 iterations with CGBN on $(NP) CPU ranks, then evaluating (about 6 min on 2 idle cores)"
	.venv/bin/horovodrun -np $(NP) -H localhost:$(NP) --gloo \
		$(PY) -m hvd_megdet.train --config configs/demo_shapes.yaml output_dir=$(DEMO_OUT) $(DEMO_DATA_OVERRIDES)
	@echo "== demo 3/3: drawing the last checkpoint's predictions on 8 validation images, ground truth beside"
	$(PY) -m hvd_megdet.predict --config configs/demo_shapes.yaml $(DEMO_DATA_OVERRIDES) \
		model.weights=$$(ls $(DEMO_OUT)/checkpoints/model_*.pth | tail -n 1) --max-images 8 \
		--input $(DEMO_DATA)/annotations/instances_val.json --output $(DEMO_OUT)/predictions
	@echo "demo outputs: $(DEMO_OUT) (eval/latest.json, metrics.jsonl, checkpoints, config.yaml, log.txt)"
	@echo "look at the predictions: $(DEMO_OUT)/predictions/*.png (left: predictions, right: ground truth)"

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not multirank"

# Lint the Dockerfiles (hadolint), then build the CPU image with rootful podman and train in it: minutes, so
# not part of `make test`, which runs the lint but not the build. Set-up and figures: docker/README.md.
docker-test: install
	$(PY) -m pytest -q tests/test_docker.py
	scripts/setup_podman.sh
	scripts/docker_test.sh

# Three containers of the CPU image as three hosts: horovodrun over ssh (Gloo and MPI), plain mpirun, a named
# network interface and ssh port, a hung rank, a lost host, elastic, and a Slurm cluster (sbatch, srun, scancel).
# Minutes, root and podman, so not part of `make test` (docker/README.md, "Testing many hosts").
multihost-test:
	scripts/setup_podman.sh
	scripts/multihost_test.sh

# The GPU image (NCCL, MPI, Gloo) on a Debian base, nvcc from NVIDIA's pip wheels, and its CPU path trained in it
# as docker-test does: no GPU needed; its GPU path not yet run (docker/README.md, "Building").
gpu-image:
	scripts/setup_podman.sh
	scripts/docker_test.sh --gpu

# The prepared GPU check on a machine with one CUDA GPU (README.md, "GPU check"): builds Horovod with NCCL for
# that GPU, then CGBN against nn.BatchNorm2d and R50-FPN images/s, into gpu_check.json.
gpu-check: install
	PYTHON=$(PY) scripts/gpu_check.sh --out output/gpu_check.json

clean:
	rm -rf .venv output data .pytest_cache
