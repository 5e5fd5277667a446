#!/usr/bin/env bash
# Root's podman for the image and cluster tests (`make docker-test`, `make multihost-test`, `make gpu-image`) on a
# Debian 12 machine without systemd: Debian's podman, runc and debootstrap, and a containers.conf that works
# there (runc: crun fails on rlimits and hybrid cgroups; cgroupfs and file events: there is no systemd). Does
# nothing when podman is already set up, and never overwrites a containers.conf it did not write.
set -euo pipefail

say() { echo "setup_podman: $*" >&2; }
die() { say "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (rootful podman)"
CONF=/etc/containers/containers.conf
MARK="# written by hvd_megdet scripts/setup_podman.sh"

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
    say "installing podman, runc, debootstrap from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman runc debootstrap iptables containernetworking-plugins netavark aardvark-dns uidmap >/dev/null
fi
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and is not ours: left as it is"
else
    mkdir -p /etc/containers
    cat >"$CONF" <<CONF
$MARK
[containers]
netns = "host"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Version.Version}}' >/dev/null || die "podman does not work here"
say "ok: podman $(podman --version | awk '{print $3}')"
