#!/usr/bin/env bash
# Compile-only check of every CUDA source in csrc/ for sm_80 and sm_90 (CI runs this).
#
# Fails on a compile error or on any local-memory spill in the ptxas report. When a Python with
# torch is available it also compiles the torch binding part (-DHFE_TORCH_BINDING, host C++).
# Without nvcc it prints a message and exits 0.
#
#   scripts/check_csrc.sh            # NVCC=/path/to/nvcc and CXX=g++ may be set
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then nvcc="$(command -v nvcc)"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc
  fi
fi
if [ -z "$nvcc" ]; then
  echo "check_csrc: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
sources=("$root"/csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_csrc: no .cu files in csrc/"
  exit 0
fi

pids=()
names=()
for cu in "${sources[@]}"; do
  for arch in 80 90; do
    name="$(basename "$cu" .cu)_sm$arch"
    ("$nvcc" -gencode="arch=compute_$arch,code=sm_$arch" -O3 -std=c++17 -Xptxas=-v -I"$root/csrc" \
        -c "$cu" -o "$tmp/$name.o" >"$tmp/$name.log" 2>&1) &
    pids+=("$!")
    names+=("$name")
  done
done

status=0
for i in "${!pids[@]}"; do
  name="${names[$i]}"
  if ! wait "${pids[$i]}"; then
    echo "FAIL $name: compile error"
    grep -iE "error" "$tmp/$name.log" | head -20
    status=1
    continue
  fi
  spills="$(grep -E '[1-9][0-9]* bytes spill (stores|loads)' "$tmp/$name.log" | head -5)"
  if [ -n "$spills" ]; then
    echo "FAIL $name: local-memory spills"
    echo "$spills"
    status=1
  else
    kernels="$(grep -c 'Compiling entry function' "$tmp/$name.log")"
    maxreg="$(grep -oE 'Used [0-9]+ registers' "$tmp/$name.log" | awk '{print $2}' | sort -n | tail -1)"
    echo "ok   $name: $kernels kernels, no spills, max ${maxreg:-?} registers"
  fi
done

# The torch binding (host C++): only when a Python with torch is at hand.
py="${PYTHON:-python3}"
if incs="$("$py" -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)"; then
  cxx="${CXX:-c++}"
  for cu in "${sources[@]}"; do
    if grep -q HFE_TORCH_BINDING "$cu"; then
      # shellcheck disable=SC2086
      if "$cxx" -std=c++20 -fsyntax-only -x c++ -DHFE_TORCH_BINDING -I"$root/csrc" $incs "$cu" 2>"$tmp/bind.log"; then
        echo "ok   $(basename "$cu") torch binding"
      else
        echo "FAIL $(basename "$cu") torch binding"
        grep -iE "error" "$tmp/bind.log" | head -20
        status=1
      fi
    fi
  done
else
  echo "check_csrc: no torch in $py; torch binding not checked"
fi
exit $status
