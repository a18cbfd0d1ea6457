#!/bin/sh
# The main job on an embedded default: build a sample Nix derivation
# (examples/hello.nix, two derivations) with `tvixfarm build` on an
# all-in-one farm inside the command (storage, one-node raft scheduler,
# runc-sandboxed executor), then show the result, its log, and a second
# build that finds everything on the farm.
# Usage: scripts/demo.sh [DATA_DIR] (default ./.demo-data).
set -eu
cd "$(dirname "$0")/.."
data=${1:-$PWD/.demo-data}
[ -x bin/tvixfarm ] && [ -x bin/farmctl ] || make build
# Real Nix evaluates (nix-instantiate) and receives the outputs; the sample's
# builder is busybox in the local store.
scripts/nix-setup.sh >/dev/null
mkdir -p "$data"
salt=$(date +%s%N)
echo "== tvixfarm build examples/hello.nix (embedded farm, data in $data)"
bin/tvixfarm build --data "$data" --argstr greeting "Hello from tvixfarm ($salt)" -o "$data/result" examples/hello.nix
echo
echo "== the result, registered in the local Nix store"
ls -l "$data/result"
"$data/result/bin/hello"
nix-store -q --references "$data/result"
echo
echo "== its build log, kept in the farm's CAS (tvixfarm log)"
bin/tvixfarm log --data "$data" "$data/result"
echo
echo "== the same build again: everything is on the farm"
bin/tvixfarm build --data "$data" --argstr greeting "Hello from tvixfarm ($salt)" -o "$data/result" examples/hello.nix
