#!/usr/bin/env bash
# Packs binaries built here for a machine that has CUDA but not the rest of our dependencies
# (the GPU host: Ubuntu with CUDA, cuBLAS and NCCL, no gRPC or RocksDB, no network).
#
#   tools/bundle.sh OUTDIR BINARY...
#
# Copies each BINARY into OUTDIR and every shared library it resolves here into OUTDIR/lib,
# except the ones the target machine provides itself: the C and C++ runtimes (a newer glibc and
# libstdc++ there run our binaries; ours would not run its system tools) and the CUDA driver and
# math libraries (the host's own cuBLAS and NCCL match its driver, and they are hundreds of MB).
# Writes OUTDIR/env.sh, which puts OUTDIR/lib and the host's cuBLAS directory on
# LD_LIBRARY_PATH: `source OUTDIR/env.sh && OUTDIR/rlhf ...`.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: tools/bundle.sh OUTDIR BINARY..." >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out/lib"

provided_by_host='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s|libcuda|libcublas|libcublasLt|libnccl)\.so'

for binary in "$@"; do
  if [[ ! -x $binary ]]; then
    echo "tools/bundle.sh: $binary is not an executable file" >&2
    exit 1
  fi
  cp -f "$binary" "$out/"
  # ldd prints "name => path (address)"; a library it cannot find is a hard error, because the
  # bundle would fail on the other machine in a less readable way.
  if ldd "$binary" | grep -q "not found"; then
    echo "tools/bundle.sh: $binary has unresolved libraries:" >&2
    ldd "$binary" | grep "not found" >&2
    exit 1
  fi
  ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    if [[ $name =~ $provided_by_host ]]; then continue; fi
    cp -fL "$path" "$out/lib/$name"
  done
done

cat > "$out/env.sh" <<'EOF'
# Sourced on the target machine: the bundled libraries first, then the host's CUDA libraries.
bundle_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cublas=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH="$bundle_dir/lib${cublas:+:$(dirname "$cublas")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
EOF
echo "bundled $# binaries into $out ($(du -sh "$out" | cut -f1))"
