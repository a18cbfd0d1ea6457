#!/bin/sh
# The REAPI side of the farm: start an all-in-one tvixfarm, show it
# serving (status, a REAPI round trip of blobs through every storage RPC,
# sandboxed REAPI actions end to end), and stop it. Usage: scripts/demo-reapi.sh [DATA_DIR] (default ./.demo-data).
set -eu
cd "$(dirname "$0")/.."
data=${1:-$PWD/.demo-data}
listen=${TVIXFARM_LISTEN:-127.0.0.1:8980}
[ -x bin/tvixfarm ] && [ -x bin/farmctl ] || make build
mkdir -p "$data"
bin/tvixfarm serve --listen "$listen" --data "$data" 2>"$data/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT INT TERM
i=0
until bin/farmctl status --farm "$listen" --timeout 1s >/dev/null 2>&1; do
	i=$((i + 1))
	if [ $i -gt 50 ] || ! kill -0 $pid 2>/dev/null; then
		echo "tvixfarm did not start; its log:" >&2
		cat "$data/serve.log" >&2
		exit 1
	fi
	sleep 0.2
done
echo "== tvixfarm serving on $listen (data in $data), pid $pid"
bin/farmctl status --farm "$listen"
echo
echo "== a REAPI round trip: FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, ByteStream (SHA-256 and BLAKE3)"
bin/farmctl bench cas --farm "$listen" --runs 1 --large-mib 16 2>/dev/null
bin/farmctl bench cas --farm "$listen" --runs 1 --large-mib 16 --digest-function blake3 2>/dev/null
echo
echo "== REAPI actions end to end: Execute -> scheduler (one-node raft) -> executor (runc sandbox) -> result"
bin/farmctl bench exec --farm "$listen" --mode trivial --actions 10
echo
bin/farmctl status --farm "$listen"
echo
echo "== stopping (SIGTERM)"
kill -TERM $pid
wait $pid || true
trap - EXIT INT TERM
tail -n 3 "$data/serve.log"
