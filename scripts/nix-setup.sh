#!/bin/sh
# Sets up real Nix (Debian's nix-bin 2.8) with the sandbox on, as the oracle
# the end-to-end tests compare tvixfarm against (frontend/testdata/nix,
# frontend/internal/nixtest). Idempotent; run as root on a Debian 12
# machine. About 2 s when everything is already installed.
#
#  1. installs nix-bin, busybox-static and jq if missing;
#  2. creates group nixbld and users nixbld1..10 if missing;
#  3. adds a deterministic busybox tree (bin/busybox + one relative symlink
#     per applet) to the store;
#  4. writes /etc/nix/nix.conf (sandbox on, /bin/sh = that busybox), keeping
#     Debian's original once as nix.conf.debian-orig;
#  5. builds a sandboxed self-test derivation.
#
# Progress goes to stderr; the last (only) stdout line is the busybox store
# path, which is also written to /etc/nix/tvixfarm-busybox-path.
set -eu

want_path=/nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox
want_nar=sha256:0dpnhxl4nrzl63dwzm2frzkbjw9qqapzzw5j5gj844kqlvvccyl2
want_deb=1:1.35.0-4+deb12u1+b1

say() { echo "nix-setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

# 1. Packages.
missing=
for p in nix-bin busybox-static jq; do
	if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
		missing="$missing $p"
	fi
done
if [ -n "$missing" ]; then
	say "installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	# shellcheck disable=SC2086
	apt-get install -y -qq $missing >&2
fi

# 2. Build users. Nix takes the build users from the member list of
# build-users-group, so every nixbldN must be listed in group nixbld.
if ! getent group nixbld >/dev/null; then
	say "creating group nixbld"
	groupadd --system nixbld
fi
members=$(getent group nixbld | cut -d: -f4)
i=1
while [ $i -le 10 ]; do
	u=nixbld$i
	if ! getent passwd $u >/dev/null; then
		say "creating user $u"
		useradd --system --no-create-home --home-dir /var/empty \
			--shell /usr/sbin/nologin --gid nixbld --groups nixbld \
			--comment "Nix build user $i" $u
	else
		case ",$members," in
		*",$u,"*) ;;
		*) usermod -a -G nixbld $u ;;
		esac
	fi
	i=$((i + 1))
done

# 3. The busybox tree. Nix canonicalises modes and mtimes when it adds a
# path, so the NAR depends only on the binary, the applet list and the
# symlink targets.
bb=/bin/busybox
[ -x $bb ] || die "$bb missing (busybox-static)"
tmp=$(mktemp -d /tmp/nix-setup.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/busybox/bin"
cp $bb "$tmp/busybox/bin/busybox"
(
	cd "$tmp/busybox/bin"
	for a in $($bb --list); do
		[ "$a" = busybox ] || ln -s busybox "$a"
	done
)
mkdir -p /nix/store
path=$(nix-store --add "$tmp/busybox")
nar=$(nix-store -q --hash "$path")
if [ "$path" != "$want_path" ] || [ "$nar" != "$want_nar" ]; then
	deb=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true)
	say "warning: busybox store path $path (NAR $nar) differs from the reference"
	say "warning: $want_path ($want_nar, busybox-static $want_deb); installed busybox-static is $deb"
	say "warning: every output hash of the test corpus will differ from the reference's"
fi

# 4. nix.conf.
conf=/etc/nix/nix.conf
mkdir -p /etc/nix
if [ -f $conf ] && [ ! -e $conf.debian-orig ]; then
	cp -p $conf $conf.debian-orig
fi
cat >"$tmp/nix.conf" <<EOF
# Written by tvixfarm scripts/nix-setup.sh; Debian's original is nix.conf.debian-orig.
# Debian's Nix has no sandbox shell, so /bin/sh is bind-mounted from busybox.
build-users-group = nixbld
sandbox = true
sandbox-fallback = false
sandbox-paths = /bin/sh=$path/bin/busybox
substituters =
substitute = false
experimental-features = nix-command ca-derivations
max-jobs = $(nproc)
cores = 0
keep-build-log = true
EOF
if ! cmp -s "$tmp/nix.conf" $conf; then
	say "writing $conf"
	cp "$tmp/nix.conf" $conf.tmp
	mv $conf.tmp $conf
fi

# 5. Self-test: a sandboxed build sees hostname localhost, uid 1000 and /bin/sh.
# The output is deleted afterwards so that the next run builds it again.
cat >"$tmp/selftest.nix" <<EOF
let bb = builtins.storePath "$path"; in
derivation {
  name = "tvixfarm-nix-selftest";
  system = builtins.currentSystem;
  builder = "\${bb}/bin/sh";
  PATH = "\${bb}/bin";
  args = [ "-e" "-c" ''
    echo "\$(hostname) \$(id -u) \$(/bin/sh -c 'echo binsh-ok')" > \$out
  '' ];
}
EOF
drv=$(nix-instantiate "$tmp/selftest.nix" 2>"$tmp/err") || { cat "$tmp/err" >&2; die "self-test: nix-instantiate failed"; }
out=$(nix-store -q --outputs "$drv")
nix-store --delete "$out" >/dev/null 2>&1 || true
if ! nix-store --realise "$drv" >/dev/null 2>"$tmp/err"; then
	cat "$tmp/err" >&2
	die "self-test: sandboxed build failed"
fi
got=$(cat "$out")
nix-store --delete "$out" "$drv" >/dev/null 2>&1 || true
[ "$got" = "localhost 1000 binsh-ok" ] || die "self-test: got '$got', want 'localhost 1000 binsh-ok'"
say "self-test ok: $got"

# Recorded last: nixtest takes this file as "Nix is set up".
echo "$path" >"$tmp/bbpath"
cmp -s "$tmp/bbpath" /etc/nix/tvixfarm-busybox-path 2>/dev/null ||
	cp "$tmp/bbpath" /etc/nix/tvixfarm-busybox-path

echo "$path"
