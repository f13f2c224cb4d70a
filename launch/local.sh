#!/usr/bin/env bash
# Run an entry point on this machine with the project's Python.
#
#   launch/local.sh [--dry_run] [--fake_devices N] [--processes N] [--port P] ENTRY [ARGS...]
#
# ENTRY is a module (clip_jax.train) or a .py file. Python: $PYTHON, else REPO/.venv/bin/python,
# else python3. --fake_devices N makes the CPU look like N devices (XLA_FLAGS), so meshes and
# sharding run as on an accelerator. --processes N starts N processes on localhost that form one
# multi-process job (coordinator on --port, default a free one), each told its
# --coordinator_address/--num_processes/--process_id; output lines are prefixed with [i].
# --dry_run prints each command (one shell-quoted line per process) and runs nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }

dry_run=0 fake_devices="" processes=1 port=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1; shift ;;
    --fake_devices) [ $# -ge 2 ] || die "--fake_devices needs a number"; fake_devices="$2"; shift 2 ;;
    --fake_devices=*) fake_devices="${1#*=}"; shift ;;
    --processes) [ $# -ge 2 ] || die "--processes needs a number"; processes="$2"; shift 2 ;;
    --processes=*) processes="${1#*=}"; shift ;;
    --port) [ $# -ge 2 ] || die "--port needs a number"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) die "unknown option $1 (options go before the entry point)" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
[ -z "$fake_devices" ] || is_count "$fake_devices" || die "--fake_devices must be a positive integer, got '$fake_devices'"
is_count "$processes" || die "--processes must be a positive integer, got '$processes'"
[ -z "$port" ] || { is_count "$port" && [ "${#port}" -le 5 ] && [ "$port" -le 65535 ]; } || die "--port must be in [1, 65535], got '$port'"

entry="$1"; shift
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then py="$REPO/.venv/bin/python"
else py="python3"; fi
if [[ "$entry" == *.py ]]; then target=("$entry"); else target=(-m "$entry"); fi

env_vars=("PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}")
if [ -n "$fake_devices" ]; then
  env_vars+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$fake_devices")
fi
if [ -n "$fake_devices" ] || [ "$processes" -gt 1 ]; then
  # Forced host devices and localhost process groups are CPU features.
  env_vars+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}")
fi

if [ "$processes" -eq 1 ]; then
  cmd=(env "${env_vars[@]}" "$py" "${target[@]}" "$@")
  if [ "$dry_run" -eq 1 ]; then printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo; exit 0; fi
  exec "${cmd[@]}"
fi

if [ -z "$port" ]; then
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
pids=()
for ((i = 0; i < processes; i++)); do
  cmd=(env "${env_vars[@]}" "$py" "${target[@]}" "$@"
       "--coordinator_address=localhost:$port" "--num_processes=$processes" "--process_id=$i")
  if [ "$dry_run" -eq 1 ]; then printf '%q ' "${cmd[@]}" | sed 's/ $//'; echo; continue; fi
  ( "${cmd[@]}" 2>&1 | sed -u "s/^/[$i] /"; exit "${PIPESTATUS[0]}" ) &
  pids+=($!)
done
[ "$dry_run" -eq 0 ] || exit 0
# A process that dies leaves the others waiting on it until JAX's timeouts; end them all at once.
stop_all() { for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
status=0
for ((n = 0; n < processes; n++)); do
  rc=0; wait -n || rc=$?
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; stop_all; fi
done
exit "$status"
