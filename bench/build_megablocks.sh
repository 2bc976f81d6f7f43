#!/usr/bin/env bash
# The optional MegaBlocks expert backend (moeut_ds/experts/megablocks_backend.py): fetch its three source archives
# where PyPI is reachable, then build them on the CUDA machine into a folder to put on PYTHONPATH.
#
#   bash bench/build_megablocks.sh fetch DIR             # megablocks 0.10.0, stanford-stk 0.7.1, grouped_gemm 0.3.0
#   bash bench/build_megablocks.sh build DIR TARGET      # on the GPU machine (~2 min), then PYTHONPATH=TARGET:...
#
# megablocks pins torch 2.7.0 and, as shipped, its CUDA extension does not compile against CUDA 13's CUB (the
# `debug_synchronous` argument of cub::DeviceScan::ExclusiveSum/InclusiveSum is gone). The build removes that
# argument, installs with --no-deps --no-build-isolation (the packages' pins clash with the installed torch), and
# builds grouped_gemm's CUTLASS grouped GEMM (GROUPED_GEMM_CUTLASS=1: one kernel for all experts, counts read on the
# device; the default build runs one cuBLAS GEMM per expert and needs the counts on the host).
set -euo pipefail

ARCHIVES=(   # PyPI project, file, sha256
  "megablocks megablocks-0.10.0.tar.gz 956fd9880fa869f7468da125da230733d5f84e10a9f8c2991e5e16523c6fe1e0"
  "stanford-stk stanford_stk-0.7.1.tar.gz fc46140c2572ee9c008b2ac67ee6656f63f49c1074da8aea0923fa8290702871"
  "grouped-gemm grouped_gemm-0.3.0.tar.gz f0555da33a975610e9160f52449082c5e699525524581a0e5f990b14b02676a3"
)

usage() { sed -n '2,6p' "$0" >&2; exit 2; }

fetch() {
  local dir=$1 project file sha url
  mkdir -p "$dir"
  for entry in "${ARCHIVES[@]}"; do
    read -r project file sha <<< "$entry"
    url=$(curl -fsS "https://pypi.org/simple/$project/" | grep -o "https://[^\"#]*/$file" | head -1) ||
      { echo "cannot list https://pypi.org/simple/$project/ (no PyPI access?)" >&2; exit 1; }
    curl -fsSL -o "$dir/$file" "$url"
    echo "$sha  $dir/$file" | sha256sum -c --quiet || { echo "$file: checksum mismatch" >&2; exit 1; }
    echo "fetched $dir/$file"
  done
}

build() {
  local dir=$1 target=$2 work project file sha
  work=$(mktemp -d)
  mkdir -p "$target"
  for entry in "${ARCHIVES[@]}"; do
    read -r project file sha <<< "$entry"
    [ -f "$dir/$file" ] || { echo "$dir/$file missing: run '$0 fetch $dir' where PyPI is reachable" >&2; exit 1; }
    echo "$sha  $dir/$file" | sha256sum -c --quiet || { echo "$file: checksum mismatch" >&2; exit 1; }
    tar xzf "$dir/$file" -C "$work"
  done
  python3 - "$work/megablocks-0.10.0/csrc/cumsum.h" <<'PY'
import re
import sys

path = sys.argv[1]
text = open(path).read()
patched = re.sub(r",\s*debug_synchronous\)", ")", text)
if patched == text:
    sys.exit(f"{path}: no debug_synchronous argument to remove (another megablocks version?)")
open(path, "w").write(patched)
PY
  export GROUPED_GEMM_CUTLASS=1 MAX_JOBS=${MAX_JOBS:-16}
  for src in stanford_stk-0.7.1 grouped_gemm-0.3.0 megablocks-0.10.0; do
    echo "== building $src"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$target" "$work/$src"
  done
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import megablocks.ops, grouped_gemm.ops; print('megablocks and grouped_gemm import from $target')"
  rm -rf "$work"
}

case "${1:-}" in
  fetch) [ $# -eq 2 ] || usage; fetch "$2" ;;
  build) [ $# -eq 3 ] || usage; build "$2" "$3" ;;
  *) usage ;;
esac
