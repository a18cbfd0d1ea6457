#!/bin/bash
# Measure a fresh local three-node cluster (no-op executors) through a
# follower and through the leader.
#   scripts/bench-cluster.sh [TVIXFARM_BINARY]
# ACTIONS (default 20000) and CONCURRENCY (default 200) are passed to
# `farmctl bench exec`; LABEL prefixes every output line. For each target
# it also prints the CPU time of every farm process (storage, nodes,
# executors; from /proc/PID/stat) over the timed phase alone, per action.
# The cluster (deploy/local-cluster.sh, in a temporary directory) is
# stopped at the end.
set -eu
cd "$(dirname "$0")/.."
make -s build
bin=${1:-bin/tvixfarm}
label=${LABEL:-$(basename "$bin")}
dir=$(mktemp -d /tmp/tvixfarm-cluster.XXXXXX)
trap 'TVIXFARM_CLUSTER_DIR=$dir deploy/local-cluster.sh down >/dev/null 2>&1; rm -rf "$dir"' EXIT INT TERM
TVIXFARM_BIN=$bin TVIXFARM_CLUSTER_DIR=$dir TVIXFARM_CLUSTER_SANDBOX=noop deploy/local-cluster.sh up >/dev/null
sleep 3
leader=$(bin/farmctl status --farm 127.0.0.11:8980 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster"]["leader"])')
for n in 1 2 3; do
	if [ "node$n" != "$leader" ]; then follower=127.0.0.1$n:8980; break; fi
done
# cpu prints each process's CPU time in clock ticks.
cpu() {
	for p in "$dir"/*/pid; do
		echo "$(basename "$(dirname "$p")") $(awk '{print $14 + $15}' "/proc/$(cat "$p")/stat")"
	done
}
hz=$(getconf CLK_TCK)
for target in "follower=$follower" "leader=127.0.0.1${leader#node}:8980"; do
	name=${target%%=*}
	out=$dir/bench.out
	: >"$out"
	bin/farmctl bench exec --farm "${target#*=}" --actions "${ACTIONS:-20000}" --concurrency "${CONCURRENCY:-200}" 2>&1 |
		while IFS= read -r line; do
			echo "$line" >>"$out"
			case $line in
			running*) cpu >"$dir/cpu.before" ;;
			completed*) cpu >"$dir/cpu.after" ;;
			esac
		done
	grep -E "completed|dispatch|end to end" "$out" | sed "s/^/$label $name /"
	done_n=$(sed -n 's/^completed \([0-9]*\) .*/\1/p' "$out")
	if [ -n "$done_n" ] && [ "$done_n" -gt 0 ]; then
		join "$dir/cpu.before" "$dir/cpu.after" | awk -v l="$label $name" -v lead="$leader" -v n="$done_n" -v hz="$hz" '
			{ us = ($3 - $2) * 1e6 / hz / n; t += us
			  printf "%s cpu %s%s %.0f us/action\n", l, $1, ($1 == lead ? " (leader)" : ""), us }
			END { printf "%s cpu farm %.0f us/action\n", l, t }'
	fi
done
