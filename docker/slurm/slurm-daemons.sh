#!/usr/bin/env bash
# Start munged and Slurm's daemon in this container of the test cluster, as root:
#   slurm-daemons controller   slurmctld        slurm-daemons node   slurmd
# Each daemonizes; a second call starts only what is not running (after the container was restarted, say).
set -euo pipefail
install -d -o munge -g munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
case "${1:-}" in
controller) pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld ;;
node) pgrep -x slurmd >/dev/null || /usr/sbin/slurmd ;;
*) echo "usage: slurm-daemons controller|node" >&2; exit 2 ;;
esac
