#!/bin/sh
# Measure a fresh local three-node cluster (no-op executors) through a
# follower and through the leader.
#   scripts/bench-cluster.sh [TVIXFARM_BINARY]
# ACTIONS (default 20000) and CONCURRENCY (default 200) are passed to
# `farmctl bench exec`; LABEL prefixes every output line. The cluster
# (deploy/local-cluster.sh, in a temporary directory) is stopped at the end.
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
for target in "follower=$follower" "leader=127.0.0.1${leader#node}:8980"; do
	bin/farmctl bench exec --farm "${target#*=}" --actions "${ACTIONS:-20000}" --concurrency "${CONCURRENCY:-200}" 2>/dev/null |
		grep -E "completed|dispatch|end to end" | sed "s/^/$label ${target%%=*} /"
done
