#!/bin/sh
# The gateway hop (docs/BENCHMARKS.md): the wide graph (200 leaves + 1,
# frontend/testdata/nix -A wide, a fresh salt per build so nothing is
# cached) built with `tvixfarm build --farm` on three farms, same run:
#   direct   an all-in-one tvixfarm
#   plain    a tvixfarm whose executor is a stock chrooting worker
#            (executor.plain_reapi), built directly
#   gateway  a gateway (execution.backend remote) in front of plain
# gateway - plain is the cost of the hop. Needs root and Nix
# (scripts/nix-setup.sh). ROUNDS (default 3) rounds; one line per timing.
# JOBS=1 builds one derivation at a time (tvixfarm build -j 1), so that
# the difference is the hop's latency per action rather than a share of
# a parallel run (default: tvixfarm build's own -j).
set -eu
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
make -s build
bb=$(cat /etc/nix/tvixfarm-busybox-path)
work=$(mktemp -d /tmp/tvixfarm-bench-gateway.XXXXXX)
pids=""
cleanup() {
	for p in $pids; do kill "$p" 2>/dev/null || true; done
	for p in $pids; do wait "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM
direct=127.0.0.1:18980 plain=127.0.0.1:18990 gw=127.0.0.1:19000
printf 'binary_cache: {listen: ""}\n' >"$work/direct.yaml"
printf 'binary_cache: {listen: ""}\nexecutor: {plain_reapi: true}\n' >"$work/plain.yaml"
printf 'binary_cache: {listen: ""}\nmetrics_listen: 127.0.0.1:19009\nexecution:\n  backend: remote\n  remote: {address: "%s", isolated_network: true}\n' "$plain" >"$work/gw.yaml"
serve() { # name addr
	bin/tvixfarm serve --listen "$2" --data "$work/$1" --config "$work/$1.yaml" 2>"$work/$1.log" &
	pids="$pids $!"
}
serve direct "$direct"
serve plain "$plain"
sleep 2 # the gateway reads the remote's capabilities at start
serve gw "$gw"
for a in "$direct" "$plain" "$gw"; do
	i=0
	until bin/farmctl status --farm "$a" >/dev/null 2>&1; do
		i=$((i + 1)); [ "$i" -lt 100 ] || { echo "farm $a did not start" >&2; cat "$work"/*.log >&2; exit 1; }
		sleep 0.1
	done
done
secs() { # command... ; prints the wall time in seconds
	s=$(date +%s.%N)
	"$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
	e=$(date +%s.%N)
	echo "$s $e" | awk '{printf "%.2f", $2 - $1}'
}
wide() { # farm salt
	secs bin/tvixfarm build --farm "$1" ${JOBS:+-j "$JOBS"} frontend/testdata/nix -A wide --argstr busybox "$bb" --argstr salt "$2" --no-link
}
r=1
while [ "$r" -le "$rounds" ]; do
	salt=g$(date +%s%N)
	d=$(wide "$direct" "${salt}d")
	p=$(wide "$plain" "${salt}p")
	g=$(wide "$gw" "${salt}g")
	echo "round $r: wide (201 derivations, uncached${JOBS:+, -j $JOBS}): direct ${d}s, plain ${p}s, gateway→plain ${g}s; hop $(echo "$g $p" | awk '{printf "%.1f", ($1 - $2) * 1000 / 201}') ms per action"
	r=$((r + 1))
done
bin/farmctl status --farm "$gw" | sed -n '/^execution/,/^$/p'
# The gateway's own time per action (its metrics, all rounds): the hop's
# cost without the noise of the builds' wall times.
curl -s http://127.0.0.1:19009/metrics | awk '
	/^tvixfarm_gateway_phase_duration_seconds_sum/ { match($0, /phase="[a-z]*"/); p = substr($0, RSTART + 7, RLENGTH - 8); sum[p] = $2 }
	/^tvixfarm_gateway_phase_duration_seconds_count/ { match($0, /phase="[a-z]*"/); p = substr($0, RSTART + 7, RLENGTH - 8); n[p] = $2 }
	END { for (p in sum) printf "gateway phase %s: %.2f ms per action (%d actions)\n", p, sum[p] * 1000 / n[p], n[p]
	      printf "gateway hop (upload + fetch): %.2f ms per action\n", (sum["upload"] + sum["fetch"]) * 1000 / n["upload"] }'
