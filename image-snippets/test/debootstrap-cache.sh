#!/bin/sh
# Builds a minimal Debian root filesystem once and keeps it, for the bake test: a stand-in for a
# stock cloud image that phoenix-agent is baked into.
#
#   debootstrap-cache.sh [DIR]      (default /var/cache/phoenix-test/rootfs)
#
# Prints DIR when it is ready. A finished tree is marked with DIR/.phoenix-complete, so a build
# that was cut off is redone rather than used. The mirror is the one apt itself is set up with.
set -eu

dir=${1:-${PHOENIX_ROOTFS:-/var/cache/phoenix-test/rootfs}}
suite=${PHOENIX_SUITE:-bookworm}

if [ -f "$dir/.phoenix-complete" ]; then
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
if [ -f "$dir/.phoenix-complete" ]; then
	printf '%s\n' "$dir"
	exit 0
fi

rm -rf "$dir.partial"
# minbase: only the Essential packages and apt. ca-certificates is what a stock image has too.
debootstrap --variant=minbase --include=ca-certificates "$suite" "$dir.partial" "$mirror" >&2
# Make the tree look like a cloud image before its first boot.
rm -f "$dir.partial/etc/hostname"
: >"$dir.partial/etc/machine-id"
mkdir -p "$dir.partial/etc/ssh" "$dir.partial/opt/app/config"
rm -rf "$dir.partial/var/cache/apt/archives"/*.deb "$dir.partial/var/lib/apt/lists"/*_Packages
rm -rf "$dir"
mv "$dir.partial" "$dir"
touch "$dir/.phoenix-complete"
printf '%s\n' "$dir"
