#!/usr/bin/env bash
# Builds the emulator around the current tiled kernels and runs one shape: ./run.sh 2 37 37 4 2 16
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)  # the repository: tools/attention_emu/../..
work=$(mktemp -d)
python3 - "$root/kernels/cuda/cuda_ops_attention.cu" "$work/chunk.inc" <<'PY'
import sys
s = open(sys.argv[1]).read()
a = s.index('// ---- Tiled kernels')
b = s.index('}  // namespace\n\nint64_t attention_forward_scratch_floats')
open(sys.argv[2], 'w').write(
    s[a:b].replace('extern __shared__ float smem[];', 'float* smem = emu::smem();'))
PY
g++ -std=c++20 -O2 -I"$root" -I"$work" -o "$work/emu" "$here/attention_emu.cpp" -lpthread
trap 'rm -rf "$work"' EXIT
"$work/emu" "$@"
