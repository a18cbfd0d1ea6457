#!/bin/sh
# Compare tvixfarm's CAS with peers in one run on one machine.
#   scripts/bench-compare.sh [NAME=HOST:PORT ...]
# Starts a fresh tvixfarm (default config: disk backend) on 127.0.0.1:8985,
# then runs `farmctl bench cas` against it and against every peer given (for
# example bb_storage=127.0.0.1:8981 bazel-remote=127.0.0.1:8982, started
# beforehand), alternating rounds so that background noise hits all alike.
# ROUNDS (default 3) rounds of RUNS (default 5) runs each; medians are printed
# per round, as JSON lines in $OUT (default bench-results.jsonl) and as tables.
# EXTRA adds flags to every `farmctl bench cas` (e.g. "--only bytestream --chunk-kib 64").
set -eu
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
runs=${RUNS:-5}
out=${OUT:-bench-results.jsonl}
make -s build
data=$(mktemp -d /tmp/tvixfarm-bench.XXXXXX)
bin/tvixfarm serve --listen 127.0.0.1:8985 --data "$data" --log-level warn 2>"$data/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT INT TERM
until bin/farmctl status --farm 127.0.0.1:8985 --timeout 1s >/dev/null 2>&1; do
	if ! kill -0 $pid 2>/dev/null; then
		echo "bench-compare: tvixfarm serve exited (ports 8985-8987 taken?):" >&2
		cat "$data/serve.log" >&2
		exit 1
	fi
	sleep 0.2
done
: >"$out"
r=1
while [ $r -le "$rounds" ]; do
	for target in tvixfarm=127.0.0.1:8985 "$@"; do
		name=${target%%=*}
		addr=${target#*=}
		echo "== round $r: $name ($addr)"
		bin/farmctl bench cas --farm "$addr" --runs "$runs" --json ${EXTRA:-} 2>/dev/null |
			python3 -c 'import json,sys; d=json.load(sys.stdin); d["name"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$name" "$r" >>"$out"
		tail -n 1 "$out" | python3 -c '
import json,sys
d=json.loads(sys.stdin.read())
for x in d["results"]:
    tp = " %7.0f MiB/s" % x["mib_per_s"] if x.get("bytes",0) >= 1<<20 else ""
    print("  %-34s %9.2f ms%s" % (x["name"], x["median_ns"]/1e6, tp))'
	done
	r=$((r + 1))
done
