#!/bin/sh
# Builds the Debian packages phoenix-agent_VERSION_ARCH.deb and phoenix-collector_VERSION_ARCH.deb
# from binaries already built, with dpkg-deb alone (no cargo-deb: it is one more crate tree to
# compile on every build machine, and these packages are four files and three small scripts).
#
#   scripts/build-deb.sh [--bin-dir DIR] [--out DIR] [agent] [collector]
#
# --bin-dir DIR  where phoenix-agent and phoenix-collector are (default target/release: run
#                `cargo build --release -p phoenix-agent -p phoenix-collector` first)
# --out DIR      where the .deb files go (default target/debian); their paths are printed
# Each package holds the binary in /usr/bin, the hardened systemd unit, an example config and
# maintainer scripts that create no user: the units run as systemd's DynamicUser.
# Env: DEB_COMPRESSION (dpkg-deb -Z: xz, the default; gzip; none, for tests).
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
bin_dir=$here/target/release
out=$here/target/debian
which=
while [ $# -gt 0 ]; do
	case $1 in
	--bin-dir) bin_dir=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	agent | collector) which="$which $1"; shift ;;
	-h | --help) sed -n '2,/^set -eu/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
	*) echo "build-deb.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
	esac
done
[ -n "$which" ] || which="agent collector"
command -v dpkg-deb >/dev/null || { echo "build-deb.sh: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$here/Cargo.toml")
arch=$(dpkg --print-architecture)
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The release binaries need glibc 2.34 (docs/baking.md): dpkg refuses them on an older system
# instead of a binary that fails to start.
depends="libc6 (>= 2.34)"

build() {
	name=$1 desc=$2 example=$3 example_dest=$4
	bin=$bin_dir/$name
	[ -x "$bin" ] || { echo "build-deb.sh: no $bin: build it first (cargo build --release -p $name), or give --bin-dir" >&2; exit 1; }
	root=$stage/$name
	mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/share/doc/$name"
	install -m 0755 "$bin" "$root/usr/bin/$name"
	# The snippet units name /usr/local/bin (install.sh, cloud-init); a package owns /usr/bin.
	sed "s|^ExecStart=/usr/local/bin/|ExecStart=/usr/bin/|" "$here/image-snippets/systemd/$name.service" >"$root/lib/systemd/system/$name.service"
	chmod 0644 "$root/lib/systemd/system/$name.service"
	install -m 0644 "$here/image-snippets/$example" "$root/usr/share/doc/$name/$example"
	if [ -n "$example_dest" ]; then
		mkdir -p "$root$(dirname "$example_dest")"
		install -m 0644 "$here/image-snippets/$example" "$root$example_dest"
		printf '%s\n' "$example_dest" >"$root/DEBIAN/conffiles"
	fi
	if [ "$name" = phoenix-agent ]; then
		# Where `phoenix-agent bake --out` puts the baseline.
		mkdir -p "$root/usr/share/phoenix-agent"
	fi
	size=$(du -sk "$root" | cut -f1)
	cat >"$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $version
Architecture: $arch
Maintainer: Phoenix maintainers <phoenix@localhost>
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Homepage: https://github.com/phoenix-fleet/phoenix
Description: $desc
CONTROL
	cat >"$root/DEBIAN/postinst" <<POSTINST
#!/bin/sh
# No user is created: the unit runs as systemd's DynamicUser, made only while it runs.
set -e
if [ "\$1" = configure ]; then
	if command -v deb-systemd-helper >/dev/null 2>&1; then
		deb-systemd-helper enable $name.service >/dev/null || true
	fi
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload || true
	fi
fi
POSTINST
	cat >"$root/DEBIAN/prerm" <<PRERM
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -d /run/systemd/system ]; then
	systemctl stop $name.service || true
fi
PRERM
	cat >"$root/DEBIAN/postrm" <<POSTRM
#!/bin/sh
set -e
if [ "\$1" = purge ] && command -v deb-systemd-helper >/dev/null 2>&1; then
	deb-systemd-helper purge $name.service >/dev/null || true
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi
POSTRM
	chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
	deb=$out/${name}_${version}_${arch}.deb
	dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
	printf '%s\n' "$deb"
}

for w in $which; do
	case $w in
	agent) build phoenix-agent "Ships metrics, logs and a config-drift hash off an immutable server
 phoenix-agent reads /proc, log files, the journal and watched files, and sends
 reports to phoenix-collector. It listens on nothing and changes nothing." agent.toml.example "" ;;
	collector) build phoenix-collector "Takes phoenix-agent reports into InfluxDB and marks instances for replacement
 phoenix-collector writes every point to InfluxDB (v1 or v2 API), keeps fleet
 state and marks drifted or unhealthy instances for a recycler." collector.toml.example /etc/phoenix-collector/collector.toml ;;
	esac
done
