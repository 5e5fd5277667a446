# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
PY := .venv/bin/python
INSTALLED := .venv/.requirements-installed
NP ?= 2
DEMO_DATA ?= data/shapes
DEMO_OUT ?= output/demo

.PHONY: install demo test test-fast bench docker-test clean

install: $(INSTALLED)
	PYTHON=$(PY) scripts/install_horovod.sh

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(PY) -m hvd_megdet.data.synthetic --out $(DEMO_DATA)
	.venv/bin/horovodrun -np $(NP) -H localhost:$(NP) --gloo \
		$(PY) -m hvd_megdet.train --config configs/demo_shapes.yaml output_dir=$(DEMO_OUT) \
		data.train.images=$(DEMO_DATA)/train data.train.annotations=$(DEMO_DATA)/annotations/instances_train.json \
		data.val.images=$(DEMO_DATA)/val data.val.annotations=$(DEMO_DATA)/annotations/instances_val.json
	@echo "demo outputs: $(DEMO_OUT) (eval/latest.json, metrics.jsonl, checkpoints, config.yaml)"

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not multirank"

# Lint the Dockerfiles (hadolint), then build the CPU image with rootful podman and train in it: minutes, so
# not part of `make test`, which runs the lint but not the build. Set-up and figures: docker/README.md.
docker-test: install
	$(PY) -m pytest -q tests/test_docker.py
	scripts/docker_test.sh

clean:
	rm -rf .venv output data .pytest_cache
