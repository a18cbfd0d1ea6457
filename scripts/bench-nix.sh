#!/bin/sh
# tvixfarm build against nix-build, same machine, same run (docs/BENCHMARKS.md).
#   scripts/bench-nix.sh            # ROUNDS (default 3) alternating rounds
# Each round: the wide graph (200 leaves + 1, frontend/testdata/nix -A wide)
# with a fresh salt, so nothing is cached, built by `nix-build -j2` (the
# sandbox on, as scripts/nix-setup.sh configures it) and by `tvixfarm build`
# on a new embedded farm; then graph1000 (1,001 derivations) built once on
# that farm and rebuilt fully cached (timed). Prints one line per timing.
# Needs root and Nix (scripts/nix-setup.sh).
set -eu
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
make -s build
bb=$(cat /etc/nix/tvixfarm-busybox-path)
work=$(mktemp -d /tmp/tvixfarm-bench-nix.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
secs() { # command... ; prints the wall time in seconds
	s=$(date +%s.%N)
	"$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
	e=$(date +%s.%N)
	echo "$s $e" | awk '{printf "%.2f", $2 - $1}'
}
r=1
while [ "$r" -le "$rounds" ]; do
	salt=b$(date +%s%N)
	nix=$(secs nix-build -j2 frontend/testdata/nix -A wide --argstr busybox "$bb" --argstr salt "${salt}n" --no-out-link)
	tf=$(secs bin/tvixfarm build frontend/testdata/nix -A wide --argstr busybox "$bb" --argstr salt "${salt}t" --no-link --data "$work/farm$r")
	echo "round $r: wide (201 derivations, uncached): nix-build -j2 ${nix}s, tvixfarm build ${tf}s, ratio $(echo "$tf $nix" | awk '{printf "%.2f", $1 / $2}')"
	secs bin/tvixfarm build frontend/testdata/nix -A graph1000 --argstr busybox "$bb" --argstr salt "$salt" --no-link --data "$work/farm$r" >/dev/null
	c=$(secs bin/tvixfarm build frontend/testdata/nix -A graph1000 --argstr busybox "$bb" --argstr salt "$salt" --no-link --data "$work/farm$r")
	echo "round $r: graph1000 (1,001 derivations) fully cached rebuild: tvixfarm build ${c}s"
	r=$((r + 1))
done
