#!/usr/bin/env bash
# Run an SSH daemon as the container's non-root user, so that horovodrun on another node can start ranks in
# this container (docker/README.md, "Many nodes"). Mount the key directory at ~/.ssh: authorized_keys is
# required, and owned by the user with no group or world write access (sshd's StrictModes).
# Usage: hvd-sshd [PORT]     PORT defaults to 12345; pass the same one to horovodrun -p.
set -euo pipefail
port=${1:-12345}
[ -s "$HOME/.ssh/authorized_keys" ] \
    || { echo "hvd-sshd: no $HOME/.ssh/authorized_keys; mount a key directory at $HOME/.ssh" >&2; exit 1; }
# A non-root sshd cannot read the system host keys (nor use PAM): it gets a fresh key of its own.
key_dir=$(mktemp -d)
ssh-keygen -q -t ed25519 -N '' -f "$key_dir/ssh_host_ed25519_key"
echo "hvd-sshd: listening on port $port as $(id -un)" >&2
exec /usr/sbin/sshd -D -e -p "$port" -h "$key_dir/ssh_host_ed25519_key" -o PidFile=none -o UsePAM=no
