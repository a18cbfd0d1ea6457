#!/bin/sh
# local-cluster.sh up|down|status: a tvixfarm cluster on one machine, as
# separate processes on 127.0.0.x loopback addresses:
#   storage     127.0.0.10:8980 (Nix binary cache on :8981)
#   scheduler   node1..node3 at 127.0.0.11..13:8980 (Nix binary cache on :8981,
#               raft on :8982), one raft cluster
#   executors   exec1, exec2 at 127.0.0.21..22:8980, connected to node1 and node2
#               first, and to another node when that one dies
# Every process serves metrics and Go profiles on :8983 of its address
# (/metrics, /debug/pprof/).
# `up` prints the address for clients on a line of its own: "client: HOST:PORT",
# and the binary cache's URL: "binary cache: http://HOST:PORT".
# `down` stops the processes by the PIDs `up` recorded.
#
# Environment:
#   TVIXFARM_CLUSTER_DIR      state, logs and PIDs (default /tmp/tvixfarm-cluster)
#   TVIXFARM_BIN              the tvixfarm binary (default: bin/tvixfarm of this repo, built if missing)
#   TVIXFARM_CLUSTER_SANDBOX  executor sandbox: runc (default, needs root), unsandboxed or noop
#   TVIXFARM_CLUSTER_SLOTS    slots per executor (default: CPUs; 256 for noop)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
dir=${TVIXFARM_CLUSTER_DIR:-/tmp/tvixfarm-cluster}
bin=${TVIXFARM_BIN:-$here/bin/tvixfarm}
sandbox=${TVIXFARM_CLUSTER_SANDBOX:-runc}
slots=${TVIXFARM_CLUSTER_SLOTS:-0}
if [ "$sandbox" = noop ] && [ "$slots" = 0 ]; then slots=256; fi

storage=127.0.0.10:8980
nodes="node1:127.0.0.11 node2:127.0.0.12 node3:127.0.0.13"
executors="exec1:127.0.0.21:127.0.0.11:8980,127.0.0.12:8980,127.0.0.13:8980 exec2:127.0.0.22:127.0.0.12:8980,127.0.0.13:8980,127.0.0.11:8980"
client=127.0.0.11:8980

start() { # name role listen config [flags...]
	name=$1 role=$2 listen=$3 config=$4
	shift 4
	mkdir -p "$dir/$name"
	if [ -f "$dir/$name/pid" ] && kill -0 "$(cat "$dir/$name/pid")" 2>/dev/null; then
		echo "$name already runs (pid $(cat "$dir/$name/pid"))" >&2
		return
	fi
	"$bin" serve --role "$role" --listen "$listen" --data "$dir/$name/data" --config "$config" "$@" \
		>"$dir/$name/log" 2>&1 &
	echo $! >"$dir/$name/pid"
}

up() {
	if [ ! -x "$bin" ]; then
		make -C "$here" build >&2
	fi
	mkdir -p "$dir"
	peers=""
	for n in $nodes; do
		peers="$peers    - {id: ${n%%:*}, raft: \"${n#*:}:8982\"}
"
	done
	printf 'metrics_listen: "%s:8983"\n' "${storage%:*}" >"$dir/storage.yaml"
	start storage storage "$storage" "$dir/storage.yaml" --http-listen "${storage%:*}:8981"
	for n in $nodes; do
		id=${n%%:*} host=${n#*:}
		cat >"$dir/$id.yaml" <<YAML
metrics_listen: "$host:8983"
scheduler:
  node_id: $id
  raft_listen: "$host:8982"
  storage: "$storage"
  peers:
$peers
YAML
		start "$id" scheduler "$host:8980" "$dir/$id.yaml" --http-listen "$host:8981"
	done
	for e in $executors; do
		id=${e%%:*} rest=${e#*:}
		host=${rest%%:*} sched=${rest#*:}
		cat >"$dir/$id.yaml" <<YAML
metrics_listen: "$host:8983"
executor:
  name: $id
  sandbox: $sandbox
  slots: $slots
  storage: "$storage"
  scheduler: "$sched"
YAML
		start "$id" executor "$host:8980" "$dir/$id.yaml"
	done
	# Wait for a leader that knows both workers.
	farmctl=$(dirname "$bin")/farmctl
	[ -x "$farmctl" ] || farmctl=$here/bin/farmctl
	i=0
	while :; do
		if out=$("$farmctl" workers --farm "$client" 2>/dev/null) && echo "$out" | grep -q exec1 && echo "$out" | grep -q exec2; then
			break
		fi
		i=$((i + 1))
		if [ $i -gt 300 ]; then
			echo "local-cluster: the cluster did not come up within 30 s; logs in $dir/*/log" >&2
			status >&2 || true
			exit 1
		fi
		sleep 0.1
	done
	# Every process must be ours and alive (a leftover cluster on the same
	# addresses would have answered the wait above).
	for p in "$dir"/*/pid; do
		if ! kill -0 "$(cat "$p")" 2>/dev/null; then
			name=$(basename "$(dirname "$p")")
			echo "local-cluster: $name exited; its log:" >&2
			tail -5 "$dir/$name/log" >&2
			down >&2
			exit 1
		fi
	done
	echo "nodes: 127.0.0.11:8980 127.0.0.12:8980 127.0.0.13:8980"
	echo "client: $client"
	echo "binary cache: http://${client%:*}:8981"
}

down() {
	for p in "$dir"/*/pid; do
		[ -f "$p" ] || continue
		pid=$(cat "$p")
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
		fi
	done
	for p in "$dir"/*/pid; do
		[ -f "$p" ] || continue
		pid=$(cat "$p")
		i=0
		while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		kill -KILL "$pid" 2>/dev/null || true
		rm -f "$p"
	done
	echo "stopped"
}

status() {
	for p in "$dir"/*/pid; do
		[ -f "$p" ] || continue
		name=$(basename "$(dirname "$p")")
		if kill -0 "$(cat "$p")" 2>/dev/null; then
			echo "$name: running (pid $(cat "$p"))"
		else
			echo "$name: stopped"
		fi
	done
	farmctl=$(dirname "$bin")/farmctl
	[ -x "$farmctl" ] || farmctl=$here/bin/farmctl
	"$farmctl" status --farm "$client" || true
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
	echo "usage: $0 up|down|status" >&2
	exit 2
	;;
esac
