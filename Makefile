# kiln: `make demo` and `make test` are the two commands a new user needs (see README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
RAY_DASHBOARD ?= 127.0.0.1:8265
# Where torch comes from: empty = the configured package index (the CPU wheel on our CI
# machines); a GPU node passes the CUDA wheel index of the same torch version.
TORCH_INDEX ?=
DEMO_RUN := $(CURDIR)/runs/demo/pretrain_lm
DEMO_SNN := $(CURDIR)/runs/demo/spikezip
DEMO_DIFFUSION := $(CURDIR)/runs/demo/diffusion
DEMO_GP := $(CURDIR)/runs/demo/gp_fewshot
SERVE_URL := http://127.0.0.1:8000
CURL_JSON = -H 'Content-Type: application/json' -H "Authorization: Bearer $$KILN_API_KEY"
# An 8x8 "1" (intensities in [0, 1]), the kind of image the digits SNN was trained on.
DEMO_DIGIT := [[0,0,0,1,1,0,0,0],[0,0,1,1,1,0,0,0],[0,0,0,1,1,0,0,0],[0,0,0,1,1,0,0,0],\
	[0,0,0,1,1,0,0,0],[0,0,0,1,1,0,0,0],[0,0,0,1,1,0,0,0],[0,0,1,1,1,1,0,0]]
# A held-out shapes-world image as a base64 PNG request, its caption on stderr (the GP's input).
DEMO_SHAPE := from kiln.worlds.shapes import ShapesWorld; import base64, io, json, sys; \
	from PIL import Image; world = ShapesWorld(); scene = world.scenes("test", 1)[0]; \
	png = io.BytesIO(); Image.fromarray(world.images([scene])[0]).save(png, "PNG"); \
	print("caption:", scene.caption, file=sys.stderr); \
	print(json.dumps({"images": [base64.b64encode(png.getvalue()).decode()]}))

.PHONY: install demo test test-gpu lint format clean

install: $(INSTALLED)

# The CPU build of torch goes in first so that nothing pulls a CUDA build. DeepSpeed builds
# from source against that torch (no build isolation; DS_BUILD_OPS=0 compiles no ops).
$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt numpy
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: $(INSTALLED)
	$(BIN)/python -m pytest -m gpu

# Starts a local Ray head (dashboard at http://$(RAY_DASHBOARD)) unless one is running,
# submits the embedded-default training jobs to it (the tiny LM, the SpikeZIP-TF SNN, the
# diffusion base's models that the GP ensemble reads, and the GP ensemble on them), deploys serve/config.yaml on
# them and asks each app a question with curl.
# The head gets .venv/bin first on PATH so the `python` of submitted jobs is this venv's.
# Token authentication is on: the token lives in ~/.ray/auth_token (made on first use).
# An API key for the apps: export KILN_API_KEY before the head starts (never in a file).
demo: $(INSTALLED)
	$(BIN)/ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token $(BIN)/ray status >/dev/null 2>&1 || RAY_AUTH_MODE=token \
		PATH="$(CURDIR)/$(BIN):$$PATH" \
		$(BIN)/ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address http://$(RAY_DASHBOARD) \
		--working-dir . -- python -m jobs.pretrain_lm --preset tiny --output $(DEMO_RUN)
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address http://$(RAY_DASHBOARD) \
		--working-dir . -- python -m jobs.spikezip --preset tiny --output $(DEMO_SNN)
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address http://$(RAY_DASHBOARD) \
		--working-dir . -- python -m jobs.pretrain_diffusion --preset tiny \
		--set 'stages=[vae,detector,invariant_detector,invariant_clip]' --output $(DEMO_DIFFUSION)
	RAY_AUTH_MODE=token $(BIN)/ray job submit --address http://$(RAY_DASHBOARD) \
		--working-dir . -- python -m jobs.gp_fewshot --preset tiny \
		--set base_run=$(DEMO_DIFFUSION) --output $(DEMO_GP)
	RAY_AUTH_MODE=token $(BIN)/serve deploy serve/config.yaml --address http://$(RAY_DASHBOARD)
	@for i in $$(seq 120); do \
		curl -sf $(SERVE_URL)/ready >/dev/null && curl -sf $(SERVE_URL)/v1/classify/ready \
			>/dev/null && break; sleep 2; done
	@echo
	curl -sSf $(SERVE_URL)/v1/completions $(CURL_JSON) \
		-d '{"model": "kiln-tiny", "prompt": "12+7=", "max_tokens": 12, "temperature": 0}'
	@echo
	curl -sSf $(SERVE_URL)/v1/classify/snn $(CURL_JSON) -d '{"images": [$(DEMO_DIGIT)]}'
	@echo
	$(BIN)/python -c '$(DEMO_SHAPE)' | curl -sSf $(SERVE_URL)/v1/classify/gp $(CURL_JSON) -d @-
	@echo
	@echo
	@echo "Dashboard (jobs, Train runs, Tune sweeps, Serve): http://$(RAY_DASHBOARD)"
	@echo "Model:        $(DEMO_RUN)/model"
	@echo "Checkpoints:  $(DEMO_RUN)/checkpoints"
	@echo "Metrics:      $(DEMO_RUN)/metrics.jsonl  $(DEMO_RUN)/summary.json"
	@echo "TensorBoard:  $(BIN)/tensorboard --logdir $(DEMO_RUN)/tensorboard"
	@echo "GP results:   $(DEMO_GP)/results.md  $(DEMO_GP)/accuracy_vs_shots.png"
	@echo "Serving:      $(SERVE_URL)/v1 (OpenAI API), $(SERVE_URL)/v1/classify/{snn,gp}"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
