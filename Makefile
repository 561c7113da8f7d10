# d2od — top-level Makefile.
#
#   make            build build/d2od and the tools
#   make run        install missing packages, build, serve the default model (models/stories260K;
#                   MODEL=... serves another, PORT=..., ARGS=... more serve options)
#   make test       install missing packages, build, run unit + integration tests
#                   (+ a ThreadSanitizer build of the daemon under API checks and a soak)
#   make test-san   unit tests under ASan/UBSan (also part of `make test`)
#   make test-gpu   GPU tests (skip cleanly without a GPU)
#   make test-gpu-emu  the GPU tests on the CUDA emulator (tests/emu/), any machine
#   make bench      CPU benchmarks (figures as ratios, see README)
#
# Options: DEBUG=1 (no optimisation, asserts, poisoning), SANITIZE=address,undefined,
# WERROR=1 (set automatically when CI=true), ARCH_FLAGS (default -march=native).
# Module folders: common/ kvpool/ engine/ api/ daemon/ kernels/ hub/ — every .c in them and
# in their subfolders (engine/tok/, engine/model/, engine/cpu/, engine/ref/, api/jinja/)
# is built; includes point one way: daemon -> api -> engine -> kvpool -> kernels
# (`make check-layers`, docs/ARCHITECTURE.md); hub/ (models by hub id) is a leaf
# beside them that only daemon/ calls.

CC ?= cc
NVCC ?= $(shell command -v nvcc 2>/dev/null || (test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc))
# SASS for Ampere and Hopper, plus compute_90 PTX that newer GPUs JIT-compile.
CUDA_ARCHS ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
              -gencode arch=compute_90,code=compute_90
ARCH_FLAGS ?= -march=native

WARN := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wpointer-arith \
        -Wno-unused-parameter -Wvla -Wformat=2
ifeq ($(CI),true)
WERROR ?= 1
endif
ifeq ($(WERROR),1)
WARN += -Werror
endif

# CUDA=1: the CUDA backend (engine/cuda/) in libd2od.a and d2od, with the kernels
# (nvcc) and the toolkit's cudart and cuBLASLt; outputs in build/cuda. Without it
# engine/cuda/ builds as a stub that refuses --device cuda (tests/emu/ runs the
# backend on the CPU either way).
ifeq ($(CUDA),1)
ifeq ($(NVCC),)
$(error CUDA=1 needs nvcc (PATH or /usr/local/cuda/bin))
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
BUILD ?= build/cuda
endif

ifeq ($(DEBUG),1)
OPT := -O0 -g3 -DD2_DEBUG_BUILD=1
BUILD ?= build/debug
else
OPT := -O3 -g $(ARCH_FLAGS) -DNDEBUG
endif

ifneq ($(SANITIZE),)
OPT := -O1 -g -fno-omit-frame-pointer -fsanitize=$(SANITIZE) -fno-sanitize-recover=undefined
LDSAN := -fsanitize=$(SANITIZE)
BUILD ?= build/san
endif
BUILD ?= build

PKG_CFLAGS := $(shell pkg-config --cflags jansson libmicrohttpd libuv libcurl libcrypto cairo 2>/dev/null)
PKG_LIBS := $(shell pkg-config --libs jansson libmicrohttpd libuv libcurl libcrypto cairo 2>/dev/null || echo -ljansson -lmicrohttpd -luv -lcurl -lcrypto -lcairo)

CFLAGS ?=
CFLAGS += -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE $(WARN) $(OPT) -pthread -MMD -MP -I. $(PKG_CFLAGS)
LDFLAGS += -pthread $(LDSAN)
LDLIBS += $(PKG_LIBS) -lm

ifeq ($(CUDA),1)
CFLAGS += -DD2_HAVE_CUDA -isystem $(CUDA_HOME)/include
LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart -lstdc++
endif

LIB_DIRS := common kvpool engine api kernels hub
LIB_SRC := $(sort $(foreach d,$(LIB_DIRS),$(wildcard $(d)/*.c $(d)/*/*.c)))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
DAEMON_SRC := $(wildcard daemon/*.c)
DAEMON_OBJ := $(DAEMON_SRC:%.c=$(BUILD)/obj/%.o)
TEST_SRC := $(wildcard tests/unit/test_*.c)
TEST_BIN := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)
TOOL_SRC := $(wildcard tools/*.c)
TOOL_BIN := $(TOOL_SRC:tools/%.c=$(BUILD)/tools/%)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
CU_SRC := $(wildcard kernels/*.cu)
CU_OBJ := $(CU_SRC:%.cu=$(BUILD)/obj/%.cu.o)

.PHONY: check-layers check-funcs all run test test-unit test-san test-integration test-gpu gpu-test-build test-gpu-emu gpu-emu-build bench deps cuda clean fuzz
FUZZ_REPLAY := $(FUZZ_SRC:tests/fuzz/%.c=$(BUILD)/fuzz-replay/%)
all: $(BUILD)/d2od $(TOOL_BIN) $(TEST_BIN) $(FUZZ_REPLAY) cuda

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# api/ui.c embeds the page with .incbin: rebuild it when the page changes.
$(BUILD)/obj/api/ui.o: api/ui.html

ifeq ($(CUDA),1)
LIB_OBJ += $(CU_OBJ)
endif
$(BUILD)/libd2od.a: $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/d2od: $(DAEMON_OBJ) $(BUILD)/libd2od.a
	$(CC) $(LDFLAGS) $^ $(LDLIBS) -o $@

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libd2od.a tests/test.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@

# The GEMM kernels select their ISA path at compile time: on x86-64 the
# kernel test also runs against matmul.c built for AVX2 (-march=haswell) and
# for AVX-512 without BF16/VNNI (-march=skylake-avx512), whatever ARCH_FLAGS
# is; the sanitizer build covers the baseline (scalar) path. Each binary skips
# on a CPU without its ISA. Not in sanitizer builds (they set their own OPT).
ifeq ($(shell uname -m),x86_64)
ifeq ($(SANITIZE),)
MM_VARIANTS := avx2 avx512
MM_FLAGS_avx2 := -march=haswell -DD2_MM_VARIANT_AVX2
MM_FLAGS_avx512 := -march=skylake-avx512 -DD2_MM_VARIANT_AVX512
MM_TEST_BIN := $(MM_VARIANTS:%=$(BUILD)/tests/test_matmul_%)
# kept (not intermediate), so a second make does not rebuild and relink them
.SECONDARY: $(MM_VARIANTS:%=$(BUILD)/obj/mm-%/matmul.o)
all: $(MM_TEST_BIN)
$(BUILD)/obj/mm-%/matmul.o: engine/cpu/matmul.c
	@mkdir -p $(dir $@)
	$(CC) $(filter-out $(ARCH_FLAGS),$(CFLAGS)) $(MM_FLAGS_$*) -c $< -o $@
$(BUILD)/tests/test_matmul_%: tests/unit/test_matmul.c $(BUILD)/obj/mm-%/matmul.o $(BUILD)/libd2od.a tests/test.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(filter -D%,$(MM_FLAGS_$*)) $(LDFLAGS) $< $(BUILD)/obj/mm-$*/matmul.o $(BUILD)/libd2od.a $(LDLIBS) -o $@
endif
endif

$(BUILD)/tools/%: tools/%.c $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@

# Fuzz targets as plain replay programs (any compiler): run over seed corpora by
# tests/integration/test_fuzz_replay.py.
$(BUILD)/fuzz-replay/%: tests/fuzz/%.c tests/fuzz/replay.h $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DD2_FUZZ_STANDALONE -Wno-missing-prototypes $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@

# CUDA sources compile whenever nvcc exists (as in CI); nothing here needs a GPU.
ifneq ($(NVCC),)
cuda: $(CU_OBJ)
$(BUILD)/obj/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) -std=c++17 -O3 $(CUDA_ARCHS) -I. -Xcompiler -Wall -c $< -o $@
$(CU_OBJ): kernels/kernels.h $(wildcard kernels/*.cuh) common/status.h

# GPU kernel tests: each tests/gpu/test_X.cu is its own nvcc program linked with the
# kernel sources; each compares kernels with a CPU reference and skips (exit 0) without
# a device. test-gpu runs them all and fails when any failed.
GPU_TEST_SRC := $(wildcard tests/gpu/test_*.cu)
GPU_TEST_BIN := $(GPU_TEST_SRC:tests/gpu/%.cu=$(BUILD)/tests-gpu/%)
$(BUILD)/tests-gpu/%: tests/gpu/%.cu $(CU_SRC) kernels/kernels.h $(wildcard kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) -std=c++17 -O3 $(CUDA_ARCHS) -I. -Xcompiler -Wall $< $(CU_SRC) -o $@
# One kernel file as an uncompressed fatbinary: tests/run_all.sh checks that the
# build embeds PTX (the ".target sm_90" line of compute_90 PTX).
$(BUILD)/ptx/sample.fatbin: kernels/sample.cu kernels/kernels.h $(wildcard kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) -std=c++17 -O3 $(CUDA_ARCHS) -Xfatbin -compress=false -fatbin -I. $< -o $@
# The CUDA backend against the CPU backend on a real device (CUDA=1 builds only).
ifeq ($(CUDA),1)
$(BUILD)/tests-gpu/test_backend_cuda: tests/gpu/test_backend_cuda.c $(BUILD)/libd2od.a tests/test.h tests/gpu/side.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@
GPU_TEST_BIN += $(BUILD)/tests-gpu/test_backend_cuda
$(BUILD)/tests-gpu/test_sample_cuda: tests/gpu/test_sample_cuda.c $(BUILD)/libd2od.a tests/test.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@
GPU_TEST_BIN += $(BUILD)/tests-gpu/test_sample_cuda
$(BUILD)/tests-gpu/test_graphs_cuda: tests/gpu/test_graphs_cuda.c $(BUILD)/libd2od.a tests/test.h tests/gpu/side.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@
GPU_TEST_BIN += $(BUILD)/tests-gpu/test_graphs_cuda
$(BUILD)/tests-gpu/bench_cuda: tests/gpu/bench_cuda.c $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) $< $(BUILD)/libd2od.a $(LDLIBS) -o $@
endif
gpu-test-build: $(GPU_TEST_BIN) $(BUILD)/ptx/sample.fatbin
test-gpu: $(GPU_TEST_BIN)
	@rc=0; for t in $(GPU_TEST_BIN); do echo "== $$t"; $$t || rc=1; done; exit $$rc
else
cuda:
	@echo "nvcc not found: CUDA sources not compiled"
test-gpu:
	@echo "skip: nvcc not found"
gpu-test-build:
endif

# The GPU tests on the CUDA emulator (tests/emu/README): every tests/gpu/test_*.cu
# and kernels/*.cu, rewritten by tests/emu/rewrite.pl (line numbers kept), built
# with g++ under ASan+UBSan and run with CUDAEMU_STRICT=1. Needs no nvcc and no GPU.
EMU_CXX ?= g++
EMU_DIR := build/emu
EMU_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize-sections=emu_shared
EMU_FLAGS := -std=c++17 -O2 -g -fno-omit-frame-pointer $(EMU_SAN) -Wall -Wno-unknown-pragmas -Wno-sign-compare \
             $(if $(filter 1,$(WERROR)),-Werror) -I$(EMU_DIR)/src -Itests/emu/include -I.
EMU_CUH := $(patsubst %,$(EMU_DIR)/src/%,$(wildcard kernels/*.cuh))
EMU_KOBJ := $(CU_SRC:%.cu=$(EMU_DIR)/obj/%.o)
EMU_TEST_SRC := $(wildcard tests/gpu/test_*.cu) tests/emu/test_emu.cu
EMU_TEST_BIN := $(patsubst %.cu,$(EMU_DIR)/bin/%,$(notdir $(EMU_TEST_SRC)))
$(EMU_DIR)/src/%: % tests/emu/rewrite.pl
	@mkdir -p $(dir $@)
	@perl tests/emu/rewrite.pl $< $@
$(EMU_DIR)/obj/%.o: $(EMU_DIR)/src/%.cu $(EMU_CUH) kernels/kernels.h common/status.h tests/emu/cuda_emu.h
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -x c++ -c $< -o $@
$(EMU_DIR)/obj/cuda_emu.o: tests/emu/cuda_emu.cpp tests/emu/cuda_emu.h
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -c $< -o $@
$(EMU_DIR)/bin/%: $(EMU_DIR)/src/tests/gpu/%.cu $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(EMU_CUH)
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -x c++ $< -x none $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o -o $@
$(EMU_DIR)/bin/test_emu: $(EMU_DIR)/src/tests/emu/test_emu.cu $(EMU_DIR)/obj/cuda_emu.o
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -x c++ $< -x none $(EMU_DIR)/obj/cuda_emu.o -o $@
# Host C code over the emulator (tests/emu/README, "C host code"): the CUDA
# backend (engine/cuda/, built with D2_HAVE_CUDA against tests/emu/include_c/:
# the C runtime subset and the cuBLASLt shim) and its test against the CPU
# backend, linked with the emulated kernels and the normal libd2od.a (whose
# engine/cuda/backend.o is the no-CUDA stub; the emulator build comes first).
EMU_CFLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE $(WARN) -O2 -g -fno-omit-frame-pointer \
              -fsanitize=address,undefined -fno-sanitize-recover=undefined -pthread \
              -DD2_HAVE_CUDA -Itests/emu/include_c -I.
EMU_HOST_OBJ := $(EMU_DIR)/cobj/engine/cuda/backend.o $(EMU_DIR)/cobj/tests/emu/cublaslt_emu.o \
                $(EMU_DIR)/obj/cuda_rt_c.o
$(EMU_DIR)/cobj/%.o: %.c $(wildcard tests/emu/include_c/*.h) kernels/kernels.h engine/backend.h tests/gpu/side.h
	@mkdir -p $(dir $@)
	$(CC) $(EMU_CFLAGS) -c $< -o $@
$(EMU_DIR)/obj/cuda_rt_c.o: tests/emu/cuda_rt_c.cpp tests/emu/cuda_emu.h
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -c $< -o $@
$(EMU_DIR)/bin/test_backend_cuda: $(EMU_DIR)/cobj/tests/gpu/test_backend_cuda.o $(EMU_HOST_OBJ) \
                                  $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_SAN) -pthread $^ $(LDLIBS) -o $@
EMU_TEST_BIN += $(EMU_DIR)/bin/test_backend_cuda
# kern_sample against the host sampler (engine/sample.c), and device draws through the engine.
$(EMU_DIR)/bin/test_sample_cuda: $(EMU_DIR)/cobj/tests/gpu/test_sample_cuda.o $(EMU_HOST_OBJ) \
                                 $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_SAN) -pthread $^ $(LDLIBS) -o $@
EMU_TEST_BIN += $(EMU_DIR)/bin/test_sample_cuda
$(EMU_DIR)/bin/test_graphs_cuda: $(EMU_DIR)/cobj/tests/gpu/test_graphs_cuda.o $(EMU_HOST_OBJ) \
                                 $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_SAN) -pthread $^ $(LDLIBS) -o $@
EMU_TEST_BIN += $(EMU_DIR)/bin/test_graphs_cuda
# d2od itself with the CUDA backend on the emulator (tests/integration/test_device_cuda_emu.py:
# --device cuda answers as --device cpu does).
$(EMU_DIR)/bin/d2od: $(DAEMON_OBJ) $(EMU_HOST_OBJ) $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_SAN) -pthread $^ $(LDLIBS) -o $@
# The benchmark program of tests/gpu/device_run.sh, for its dry run (--tiny).
$(EMU_DIR)/bin/bench_cuda: $(EMU_DIR)/cobj/tests/gpu/bench_cuda.o $(EMU_HOST_OBJ) \
                           $(EMU_KOBJ) $(EMU_DIR)/obj/cuda_emu.o $(BUILD)/libd2od.a
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_SAN) -pthread $^ $(LDLIBS) -o $@
.PRECIOUS: $(EMU_DIR)/src/% $(EMU_DIR)/obj/%.o $(EMU_DIR)/cobj/%.o
gpu-emu-build: $(EMU_TEST_BIN) $(EMU_DIR)/bin/bench_cuda $(EMU_DIR)/bin/d2od
test-gpu-emu: gpu-emu-build
	@rc=0; for t in $(EMU_TEST_BIN); do echo "== $$t"; CUDAEMU_STRICT=1 $$t || rc=1; done; exit $$rc

deps:
	@bash tools/install-deps.sh

# Include direction (daemon -> api -> engine -> kvpool -> kernels; engine's subfolders in
# the order tools/check_layers.py states).
check-layers:
	@python3 tools/check_layers.py

# No function over 150 lines outside the justified exceptions listed in the script
# (a lexer, a dispatch table, and what the seam redesign is splitting).
check-funcs:
	@python3 tools/func_lengths.py


# The default model ships in the repository (models/stories260K, MIT); MODEL= serves another:
# a GGUF file, a Hugging Face directory, or a hub id org/name[@revision] (Hugging Face cache).
DEFAULT_MODEL := models/stories260K/stories260K.gguf
run: deps
	@$(MAKE) --no-print-directory $(BUILD)/d2od
	@echo "make run: serving $(or $(MODEL),$(DEFAULT_MODEL)) on http://127.0.0.1:$(or $(PORT),8000)"
	@echo "make run: web page http://127.0.0.1:$(or $(PORT),8000)/ ; to serve another model: make run MODEL=path/to/model.gguf | MODEL=path/to/hf-dir | MODEL=org/name[@rev] [PORT=8000] [ARGS='--api-key K ...']"
	$(BUILD)/d2od serve --model $(or $(MODEL),$(DEFAULT_MODEL)) $(if $(MODEL),,--served-model-name stories260K --ctx-len 512) --host 127.0.0.1 --port $(or $(PORT),8000) $(ARGS)

test:
	@bash tools/install-deps.sh --test
	@python3 tools/check_layers.py
	@python3 tools/func_lengths.py
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory SANITIZE=address,undefined BUILD=build/san test-unit-build
	@$(MAKE) --no-print-directory SANITIZE=thread BUILD=build/tsan build/tsan/d2od
	@$(MAKE) --no-print-directory gpu-test-build
	@$(MAKE) --no-print-directory gpu-emu-build
	@bash tests/run_all.sh

test-unit-build: $(TEST_BIN) $(TOOL_BIN) $(FUZZ_REPLAY)

test-unit: $(TEST_BIN)
	@bash tests/run_unit.sh $(BUILD)/tests

test-san:
	@$(MAKE) --no-print-directory SANITIZE=address,undefined BUILD=build/san test-unit

bench: all
	@bash tests/bench.sh $(BUILD)

# Fuzz targets (tests/fuzz/fuzz_*.c) built with clang's libFuzzer + ASan/UBSan over the
# library sources; run e.g. build/fuzz/fuzz_request -max_total_time=60.
FUZZ_CC ?= clang
FUZZ_FLAGS := -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE -I. -g -O1 -pthread \
              -fsanitize=fuzzer,address,undefined $(PKG_CFLAGS)
fuzz: $(FUZZ_SRC:tests/fuzz/%.c=build/fuzz/%)
build/fuzz/%: tests/fuzz/%.c $(LIB_SRC)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) $< $(LIB_SRC) $(LDLIBS) -o $@

clean:
	rm -rf build

-include $(LIB_OBJ:.o=.d) $(DAEMON_OBJ:.o=.d) $(TEST_BIN:=.d)
