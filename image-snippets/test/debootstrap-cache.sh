#!/bin/sh
# Builds a minimal Debian root filesystem once and keeps it, for the bake test: a stand-in for a
# stock cloud image that phoenix-agent is baked into.
#
#   debootstrap-cache.sh [DIR]      (default /var/cache/phoenix-test/rootfs)
#
# Prints DIR when it is ready. A finished tree is marked with DIR/.phoenix-complete holding what
# it was built from, so a build that was cut off, or one made with other packages, is redone
# rather than used. The mirror is the one apt itself is set up with.
set -eu

dir=${1:-${PHOENIX_ROOTFS:-/var/cache/phoenix-test/rootfs}}
suite=${PHOENIX_SUITE:-bookworm}
# What a stock cloud image has that the bake needs: cloud-init (the bake cleans its state), CA
# certificates and systemd (the package's unit is verified there). Everything else stays
# minimal. debootstrap does not resolve virtual packages: python3-cffi-backend is what
# provides the one cloud-init needs through python3-cryptography.
include=ca-certificates,cloud-init,python3-cffi-backend,systemd
stamp="$suite minbase $include v1"

ready() {
	[ -f "$dir/.phoenix-complete" ] && [ "$(cat "$dir/.phoenix-complete")" = "$stamp" ]
}

if ready; then
	printf '%s\n' "$dir"
	exit 0
fi

command -v debootstrap >/dev/null 2>&1 ||
	{ echo "debootstrap-cache.sh: debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

mirror=${PHOENIX_MIRROR:-}
if [ -z "$mirror" ]; then
	# deb822 sources first (Debian 12), then the one-line format.
	mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\/\{0,1\}\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
fi
if [ -z "$mirror" ]; then
	mirror=$(sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\([^[:space:]]*\/debian\/\{0,1\}\)[[:space:]].*/\2/p' /etc/apt/sources.list 2>/dev/null | head -n 1)
fi
mirror=${mirror:-http://deb.debian.org/debian}

lock=$dir.lock
mkdir -p "$(dirname -- "$dir")"
# One builder at a time; a second caller waits and then finds the finished tree.
exec 9>"$lock"
flock 9
if ready; then
	printf '%s\n' "$dir"
	exit 0
fi

rm -rf "$dir.partial"
debootstrap --variant=minbase --include="$include" "$suite" "$dir.partial" "$mirror" >&2
# Make the tree look like a cloud image before its first boot.
rm -f "$dir.partial/etc/hostname"
: >"$dir.partial/etc/machine-id"
mkdir -p "$dir.partial/etc/ssh" "$dir.partial/opt/app/config"
rm -rf "$dir.partial/var/cache/apt/archives"/*.deb "$dir.partial/var/lib/apt/lists"/*_Packages
rm -rf "$dir"
mv "$dir.partial" "$dir"
printf '%s\n' "$stamp" >"$dir/.phoenix-complete"
printf '%s\n' "$dir"
