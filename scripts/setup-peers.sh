#!/usr/bin/env bash
# Optional peers for `ponder bench`: llama.cpp (llama-cpp-python, built from its sdist, ~4-10 min on 2 cores).
# Run after scripts/setup.sh. Without it the bench's llama.cpp rows say they were not run and point here.
#
# Why the explicit CPU flags: a -march=native build enables llama.cpp's AMX kernels on CPUs that list AMX, and in
# VMs whose kernel does not grant the AMX tile state they crash (SIGSEGV in ggml_backend_amx_mul_mat, seen on this
# project's machines). So the build names the vector extensions the CPU has (AVX2, AVX-512, VNNI, BF16) and never AMX.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "setup-peers: run bash scripts/setup.sh first" >&2; exit 2; }
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
args="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
args="$args -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512_vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
args="$args -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_BMI2=$(has bmi2)"
args="$args -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
echo "setup-peers: building llama-cpp-python with $args"
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/python -m pip install -q --disable-pip-version-check \
  --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
.venv/bin/python -m pip install -q --disable-pip-version-check "diskcache>=5.6.1" "typing-extensions>=4.5"
.venv/bin/python -c "import llama_cpp; print('setup-peers: llama-cpp-python', llama_cpp.__version__)"
