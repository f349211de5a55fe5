#!/bin/sh
# Make a Debian 12 (bookworm) base image from Debian packages, for machines that reach a Debian
# mirror but no container registry. The result is close to debian:bookworm-slim: minbase
# packages, no documentation, man pages, locales or apt lists.
#
#   containers/make-base-image.sh [IMAGE]          (default localhost/debian:bookworm-slim)
#   podman build --build-arg BASE=localhost/debian:bookworm-slim -f containers/Containerfile .
#
# Needs root, debootstrap and podman. MIRROR and SECURITY_MIRROR choose the mirrors (default:
# the ones apt on this machine uses, else deb.debian.org).
set -eu

IMAGE=${1:-localhost/debian:bookworm-slim}
SUITE=bookworm

first_uri() {
    # $1: a word the URI contains; prints the first matching mirror apt is configured with
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
        sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
    } | grep -- "$1" | head -n 1
}

MIRROR=${MIRROR:-$(first_uri '/debian$' || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(first_uri 'debian-security' || true)}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

ROOTFS=$(mktemp -d /var/tmp/meridio-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT INT TERM

debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"

cat > "$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
SOURCES

# What debian:bookworm-slim leaves out, now and for every package installed later.
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
DPKG
find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS/usr/share/man/"* "$ROOTFS/usr/share/info/"* "$ROOTFS/usr/share/lintian/"*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$ROOTFS/var/cache/apt/"*.bin "$ROOTFS/var/cache/apt/archives/"*.deb \
    "$ROOTFS/var/lib/apt/lists/"* "$ROOTFS/var/log/"*.log "$ROOTFS/var/log/apt/"*

tar --numeric-owner -C "$ROOTFS" -c . | podman import --change 'CMD ["bash"]' - "$IMAGE"
echo "made $IMAGE from $MIRROR"
