#!/bin/sh
# Install phoenix-agent from a local release binary: no network is used, the only traffic the
# installed agent ever makes goes to the collector.
#
#   install.sh [--root DIR] [--deb FILE | --binary FILE --unit FILE] [--config FILE]
#              [--token-file FILE] [--enable] [--start]
#
# --deb FILE installs the phoenix-agent package (scripts/build-deb.sh) with dpkg: binary in
#   /usr/bin, unit in /lib/systemd/system; with --root, `dpkg --root DIR` (needs root). The
#   default when a phoenix-agent_*.deb lies next to this script and no --binary is given.
#
# --root DIR (or DESTDIR=DIR) installs into a chroot or an image mounted at DIR; nothing of the
#   running system is touched then, so it is safe inside an image build.
# --binary, --config, --unit default to the files next to this script (release tarball layout:
#   phoenix-agent, agent.toml or agent.toml.example, phoenix-agent.service or systemd/...).
#   A default config never replaces an agent.toml already installed; an explicit --config does.
# --token-file FILE, or PHOENIX_TOKEN in the environment, writes the agent token to
#   /etc/phoenix-agent/token with mode 0600 (the agent reads it via CAP_DAC_READ_SEARCH).
# --enable links the unit into multi-user.target; --start also (re)starts it on a live system.
#
# Running it again with the same inputs changes nothing: files are replaced atomically and only
# when their content differs, so a running agent's binary is never half-written.
set -eu

prog=${0##*/}
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)

die() {
	printf '%s: %s\n' "$prog" "$*" >&2
	exit 1
}

root=${DESTDIR:-}
binary=
deb=
config=
unit=
token_file=
enable=no
start=no

while [ $# -gt 0 ]; do
	case $1 in
	--root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
	--root=*) root=${1#*=}; shift ;;
	--binary) [ $# -ge 2 ] || die "--binary needs a file"; binary=$2; shift 2 ;;
	--binary=*) binary=${1#*=}; shift ;;
	--deb) [ $# -ge 2 ] || die "--deb needs a file"; deb=$2; shift 2 ;;
	--deb=*) deb=${1#*=}; shift ;;
	--config) [ $# -ge 2 ] || die "--config needs a file"; config=$2; shift 2 ;;
	--config=*) config=${1#*=}; shift ;;
	--unit) [ $# -ge 2 ] || die "--unit needs a file"; unit=$2; shift 2 ;;
	--unit=*) unit=${1#*=}; shift ;;
	--token-file) [ $# -ge 2 ] || die "--token-file needs a file"; token_file=$2; shift 2 ;;
	--token-file=*) token_file=${1#*=}; shift ;;
	--enable) enable=yes; shift ;;
	--start) enable=yes; start=yes; shift ;;
	-h | --help) sed -n '2,/^set -eu/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
done

# A trailing slash would give paths like DIR//etc: harmless, but ugly in messages.
root=${root%/}

first_of() {
	for f in "$@"; do
		if [ -f "$f" ]; then
			printf '%s\n' "$f"
			return 0
		fi
	done
	return 1
}

[ -n "$deb" ] && [ -n "$binary$unit" ] && die "--deb brings its own binary and unit: drop --binary and --unit"
if [ -z "$deb" ] && [ -z "$binary" ]; then
	for f in "$here"/phoenix-agent_*.deb; do
		[ -f "$f" ] && deb=$f
	done
fi
if [ -z "$deb" ]; then
	[ -n "$binary" ] || binary=$(first_of "$here/phoenix-agent" "$here/../target/release/phoenix-agent") ||
		die "no phoenix-agent binary next to $prog: give --deb FILE (the package) or --binary FILE (the release binary)"
	[ -n "$unit" ] || unit=$(first_of "$here/phoenix-agent.service" "$here/systemd/phoenix-agent.service") ||
		die "no phoenix-agent.service next to $prog: give --unit FILE"
else
	[ -f "$deb" ] || die "$deb does not exist or is not a regular file"
	binary=$deb unit=$deb # checked below like the others
fi
config_given=yes
if [ -z "$config" ]; then
	config_given=no
	config=$(first_of "$here/agent.toml" "$here/agent.toml.example") ||
		die "no agent.toml next to $prog: give --config FILE"
fi
for f in "$binary" "$unit" "$config"; do
	[ -f "$f" ] || die "$f does not exist or is not a regular file"
done
[ -z "$token_file" ] || [ -f "$token_file" ] || die "token file $token_file does not exist"

# put SRC DEST MODE: copy beside DEST, then rename over it, unless DEST already has that content
# and mode. The rename keeps a running binary intact ("text file busy" never happens).
put() {
	src=$1 dest=$2 mode=$3
	mkdir -p "$(dirname -- "$dest")"
	if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
		return 0
	fi
	tmp=$dest.phoenix-new.$$
	(umask 077 && cp -- "$src" "$tmp")
	chmod "$mode" "$tmp"
	if [ "$(id -u)" = 0 ]; then chown 0:0 "$tmp"; fi
	mv -f -- "$tmp" "$dest"
	printf '%s: installed %s\n' "$prog" "$dest"
}

if [ -n "$deb" ]; then
	# The package's maintainer scripts create no user; dpkg --root runs them chrooted in DIR.
	if [ -n "$root" ]; then
		dpkg --root="$root" -i "$deb" >/dev/null
	else
		dpkg -i "$deb" >/dev/null
	fi
	printf '%s: installed package %s\n' "$prog" "$deb"
	unit_path=/lib/systemd/system/phoenix-agent.service
else
	put "$binary" "$root/usr/local/bin/phoenix-agent" 0755
	put "$unit" "$root/etc/systemd/system/phoenix-agent.service" 0644
	unit_path=/etc/systemd/system/phoenix-agent.service
fi
# A config that is already there (written by cloud-init or an operator) beats the example.
if [ "$config_given" = yes ] || [ ! -f "$root/etc/phoenix-agent/agent.toml" ]; then
	put "$config" "$root/etc/phoenix-agent/agent.toml" 0644
fi
mkdir -p "$root/usr/share/phoenix-agent"

if [ -n "$token_file" ]; then
	put "$token_file" "$root/etc/phoenix-agent/token" 0600
elif [ -n "${PHOENIX_TOKEN:-}" ]; then
	tok=$(mktemp)
	trap 'rm -f "$tok"' EXIT
	printf '%s\n' "$PHOENIX_TOKEN" >"$tok"
	put "$tok" "$root/etc/phoenix-agent/token" 0600
fi

if [ "$enable" = yes ]; then
	# What `systemctl enable` does for WantedBy=multi-user.target, done by hand so it also works
	# in a chroot without systemd installed yet.
	wants=$root/etc/systemd/system/multi-user.target.wants
	target=$unit_path
	mkdir -p "$wants"
	if [ "$(readlink "$wants/phoenix-agent.service" 2>/dev/null)" != "$target" ]; then
		ln -sfn "$target" "$wants/phoenix-agent.service"
		printf '%s: enabled %s\n' "$prog" "$wants/phoenix-agent.service"
	fi
fi

# Talk to systemd only on the live system it is running on.
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
	systemctl daemon-reload
	if [ "$start" = yes ]; then
		systemctl restart phoenix-agent.service
	fi
elif [ "$start" = yes ]; then
	printf '%s: not starting: no running systemd at this root; it starts on the next boot\n' "$prog" >&2
fi
