#!/usr/bin/env bash
# Packs binaries built here for a run on the GPU machine (see ../shared/DEVICE.md):
#   [BINS="automodel am_tests ..."] tools/device_bundle.sh BUILD_DIR [OUT_DIR=.devbuild]
# copies (stripped) binaries to OUT/bin and the non-system, non-CUDA shared libraries they need to OUT/lib.
# On the device: source tools/device_env.sh (sets LD_LIBRARY_PATH to OUT/lib + the pip nvidia libraries).
# Name OUT_DIR in the run's `carry` (it is git-ignored); keep it under 64 MiB.
set -euo pipefail
B=${1:?usage: device_bundle.sh BUILD_DIR [OUT_DIR]}
O=${2:-.devbuild}
rm -rf "$O"
mkdir -p "$O/bin" "$O/lib"
for b in ${BINS:-automodel am_gpu_tests am_gpu_microbench am_microbench am_tests}; do
  if [ -f "$B/bin/$b" ]; then cp "$B/bin/$b" "$O/bin/"; strip "$O/bin/$b"; fi
done
for b in "$O"/bin/*; do ldd "$b" | awk '/=>/ {print $3}'; done | sort -u |
  grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*|libpthread|libdl|librt|libcuda|libcublas|libcublasLt|libcudnn[^/]*|libnccl|libcudart)\.so' |
  while read -r lib; do [ -n "$lib" ] && cp -L "$lib" "$O/lib/"; done
# Debian's libopenblas.so.0 is 36 MB (every kernel for every CPU); the engine calls three symbols. Relink just
# what they pull in from the static archive (26 MB -> 1.6 MB compressed) so the bundle fits the carry limit.
A=$(ls /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.a 2>/dev/null || true)
if [ -f "$O/lib/libopenblas.so.0" ] && [ -n "$A" ]; then
  gcc -shared -o "$O/lib/libopenblas.so.0" -Wl,-soname,libopenblas.so.0 -Wl,-u,cblas_sgemm \
    -Wl,-u,openblas_set_num_threads -Wl,-u,openblas_get_num_threads -Wl,-u,openblas_get_corename "$A" -lgfortran -lpthread -lm
  strip "$O/lib/libopenblas.so.0"
fi
du -sh "$O"
# The working tree + carried paths must stay under 64 MiB: also pack a compressed copy to carry instead
# (on the device: mkdir -p .devbuild && tar xJf .devpack/bundle.tar.xz -C .devbuild).
# xz -9's 64 MiB dictionary sees the code the binaries share (all link amcore statically): 23.8 -> 12.6 MB for
# automodel + am_gpu_tests + am_gpu_microbench, which keeps the tree + carry under the tool's 64 MiB.
mkdir -p .devpack
tar cf - -C "$O" . | xz -9e -T2 > .devpack/bundle.tar.xz
# bitsandbytes' source (git-ignored .bnb, for the nf4 stage of bench/device_session.sh) travels packed too.
if [ -d .bnb ] && [ -z "${W4:-}" ]; then tar cJf .devpack/bnb.tar.xz .bnb; else rm -f .devpack/bnb.tar.xz; fi
# W4=1: bench/w4.sh's inputs instead (the Llama 3 tokenizer from tools/fetch_tokenizers.sh, SQuAD v1.1 dev).
if [ -n "${W4:-}" ]; then
  tar cJf .devpack/tokenizer_llama3_1.tar.xz -C .cache/tokenizers/llama3_1 tokenizer.json tokenizer_config.json
  xz -9 -c ../shared/datasets/squad/dev-v1.1.rebuilt.json > .devpack/squad_dev.json.xz
else
  rm -f .devpack/tokenizer_llama3_1.tar.xz .devpack/squad_dev.json.xz
fi
du -sh .devpack/*
