#!/usr/bin/env bash
# The benchmarks whose figures depend on real hardware, in one bounded run for a machine
# with an accelerator and many cores (e.g. one H200 + 16 cores):
#   on the accelerator: host_vs_device (HostTable vs on-mesh step), checkpoint_overhead;
#   on the host CPUs (JAX_PLATFORMS=cpu): pipeline (bubble fraction needs a core per
#   simulated device), ps_throughput (full 50M rows), ssp_straggler.
# Usage: bash benchmarks/accelerator_suite.sh OUT_DIR [SECONDS_PER_BENCHMARK]
# Each benchmark runs under its own timeout, so one hang costs only its slot; results are
# OUT_DIR/<name>.json (the last stdout line of each script) and OUT_DIR/suite.log.
set -uo pipefail
out=${1:?usage: accelerator_suite.sh OUT_DIR [SECONDS]}
limit=${2:-150}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d)
log="$out/suite.log"
export PYTHONUNBUFFERED=1

run() {  # run NAME PLATFORM ARGS...
  local name=$1 platform=$2; shift 2
  echo "=== $name ($platform) $*" | tee -a "$log"
  local t0=$SECONDS
  if [ "$platform" = cpu ]; then
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      timeout "$limit" python3 "$here/$name.py" --out "$work" "$@" >"$work/$name.out" 2>&1
  else
    timeout "$limit" python3 "$here/$name.py" --out "$work" "$@" >"$work/$name.out" 2>&1
  fi
  local rc=$?
  tail -n 4 "$work/$name.out" | cut -c1-2000 >>"$log"
  tail -n 1 "$work/$name.out" | grep '^{' >"$out/$name.json" || rm -f "$out/$name.json"
  echo "--- $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
}

python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$log"
run host_vs_device accel
run checkpoint_overhead accel --rounds 4
run pipeline cpu --quick
run ps_throughput cpu
run ssp_straggler cpu --quick
rm -rf "$work"
