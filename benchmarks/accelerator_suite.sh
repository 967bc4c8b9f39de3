#!/usr/bin/env bash
# The benchmarks whose figures depend on real hardware, in one bounded run for a machine
# with an accelerator and many cores (e.g. one H200 + 16 cores):
#   on the accelerator: host_vs_device (HostTable vs on-mesh step), checkpoint_overhead;
#   on the host CPUs (JAX_PLATFORMS=cpu): pipeline (bubble fraction needs a core per
#   simulated device), ps_throughput (full 50M rows), ssp_straggler.
#   ps_scaling at its full sizes (100M keys) needs ~10 GB of host RAM.
# Usage: bash benchmarks/accelerator_suite.sh OUT_DIR [SCALE] [first|rest|all]
# Each benchmark runs under its own timeout (seconds x SCALE), so one hang costs only its slot; results are
# OUT_DIR/<name>.json (the last stdout line of each script) and OUT_DIR/suite.log. The limits add up to
# ~830 s, more than one device call may run (600 s): `first` runs the figures the open issues wait for
# (host_vs_device, ps_throughput, checkpoint_overhead: ~380 s), `rest` the others (~450 s).
set -uo pipefail
out=${1:?usage: accelerator_suite.sh OUT_DIR [SCALE] [first|rest|all]}
scale=${2:-1}
part=${3:-all}
case $part in first|rest|all) ;; *) echo "part must be first, rest or all, got $part" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d)
log="$out/suite.log"
export PYTHONUNBUFFERED=1

run() {  # run NAME PLATFORM SECONDS ARGS...
  local name=$1 platform=$2 limit; limit=$(python3 -c "print(int($3 * $scale))"); shift 3
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
if [ "$part" != rest ]; then
  run host_vs_device accel 110 --quick --also-ps-threads 4 --also-local-apply  # 3 interleaved rounds of 12 steps
  run ps_throughput cpu 150
  run checkpoint_overhead accel 120 --rounds 3 --interval-seconds 5
fi
if [ "$part" != first ]; then
  run pipeline cpu 180 --quick
  run ps_scaling cpu 150
  run ssp_straggler cpu 120 --quick
fi
rm -rf "$work"
