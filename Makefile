# Two commands on a fresh clone: `make demo` (the main job on a built-in example) and
# `make test` (lint, types, tests). Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

LLAMA_CPP_PY ?= 0.3.36
CONVERTER := .cache/sdist/llama.cpp/convert_hf_to_gguf.py
# The GGUF tests' oracle: llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/), from the
# llama-cpp-python sdist that vendors it. Without network the tests that need it skip.

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU build on this project's machines; a range would pull a CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The converter: the sdist's vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} into .cache/sdist/llama.cpp.
$(CONVERTER): | $(STAMP)
	mkdir -p .cache/sdist/llama.cpp
	( $(BIN)/python -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP_PY)" -d .cache/sdist \
	  && tar xzf .cache/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C .cache/sdist/llama.cpp --strip-components=3 \
	     llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/convert_hf_to_gguf.py \
	     llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/conversion \
	     llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp/gguf-py ) \
	|| echo "llama.cpp's converter not fetched: the GGUF oracle tests will skip"

# llama.cpp itself, the GGUF runtime oracle (tests/test_gguf_runtime.py): llama-cpp-python built from the same
# sdist, only the library (no tools, server, multimodal; portable kernels): ~11 min of CPU, ~6 min on 2 idle cores.
# Only `make test` builds it. Where it cannot be built the runtime tests skip, and this says so.
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF
LLAMA_STAMP := $(VENV)/.llama-cpp
$(LLAMA_STAMP): $(CONVERTER)
	( CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install --quiet \
	    .cache/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz && touch $(LLAMA_STAMP) ) \
	|| echo "llama-cpp-python could not be built here: tests/test_gguf_runtime.py will skip"

install: $(STAMP) $(CONVERTER)

demo: $(STAMP)
	$(BIN)/streammerge demo

lint: $(STAMP)
	$(BIN)/ruff check streammerge tests bench
	$(BIN)/ruff format --check streammerge tests bench
	$(BIN)/mypy

test: lint $(CONVERTER) $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
