#!/usr/bin/env bash
# Follow the documentation's "Try the deployment on one machine" steps literally: the
# commands are read from docs/deployment.md (between the loopback markers) and run by bash
# in WORKDIR, then the run directory is checked. Background processes are stopped at the
# end, even on failure.
#
#   bash deploy/loopback.sh [WORKDIR]      (default: a new temporary folder)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"
ln -sfn "$repo/deploy" deploy
page="$repo/docs/deployment.md"
steps="$work/loopback-steps.sh"
awk '/<!-- loopback:start -->/{on=1; next} /<!-- loopback:end -->/{on=0} on && !/^```/' "$page" > "$steps"
[[ -s "$steps" ]] || { echo "loopback.sh: no loopback steps found in $page" >&2; exit 2; }
echo "following $page in $work:"; sed 's/^/  | /' "$steps"

cleanup() {
  local pids
  pids="$(jobs -p)"
  [[ -n "$pids" ]] && kill $pids 2>/dev/null || true
  sleep 2
  pids="$(jobs -p)"
  [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
}
trap cleanup EXIT
set -x
source "$steps"
set +x
state="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["state"])' runs/first/status.json)"
[[ "$state" == finished ]] || { echo "loopback.sh: the run ended as '$state'" >&2; exit 1; }
echo "loopback.sh: the documented deployment steps worked; run directory $work/runs/first"
