# automodel.cpp — entry points (SPEC §0). Every target does the setup and build it needs.
JOBS ?= $(shell nproc)
BUILD ?= build
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CMAKE_ARGS ?=
ifneq ($(NVCC),)
CMAKE_ARGS += -DCMAKE_CUDA_COMPILER=$(NVCC)
endif
SETUP_STAMP := .cache/setup.stamp
APT_PACKAGES := build-essential cmake pkg-config libopenblas-dev nlohmann-json3-dev libyaml-cpp-dev \
  libgtest-dev libbenchmark-dev libpcre2-dev libutf8proc-dev bzip2 openmpi-bin libopenmpi-dev

.PHONY: setup build test test-gpu demo bench clean

setup: $(SETUP_STAMP)
$(SETUP_STAMP): Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "make setup: installing $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi
	@mkdir -p .cache && touch $(SETUP_STAMP)

$(BUILD)/Makefile: $(SETUP_STAMP) CMakeLists.txt
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: $(SETUP_STAMP) $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS)

test: build
	bash tools/fetch_tokenizers.sh || echo "make test: tokenizer fetch failed; tokenizer parity tests will skip"
	cd $(BUILD) && ctest --output-on-failure
	bash tests/cli/run_cli_tests.sh $(BUILD)/bin/automodel
	bash tests/cli/run_dist_cli_tests.sh $(BUILD)/bin/automodel

# Run on the GPU machine only.
test-gpu: build
	$(BUILD)/bin/am_gpu_tests

# The demo needs the binary only, not the tests and benchmarks.
demo: $(SETUP_STAMP) $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS) --target automodel
	bash examples/demo/run_demo.sh $(BUILD)/bin/automodel

clean:
	rm -rf $(BUILD) .cache/setup.stamp
