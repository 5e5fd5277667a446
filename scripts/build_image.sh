#!/usr/bin/env bash
# Build docker/Dockerfile with rootful podman on a local Debian base image:
#   scripts/build_image.sh         the CPU variant (MPI and Gloo), the image that `make docker-test`
#                                  (scripts/docker_test.sh) and `make multihost-test` (scripts/multihost_test.sh) run
#   scripts/build_image.sh --gpu   the GPU variant (NCCL, MPI and Gloo; `make gpu-image`), with nvcc from pip wheels
# A rebuild with nothing changed takes seconds; after a code change, the last layers only. The two variants share
# every layer up to Horovod's build.
#
# Needs root and podman, runc, debootstrap (set-up: docker/README.md, "Testing the image").
# The host's pip settings (index URLs, local wheel folders, the CA bundle of an intercepting proxy) reach the
# build's RUN steps as read-only bind mounts, for this build only: they are not part of the image.
#
# Environment (all optional):
#   IMAGE          tag to build (default: localhost/hvd_megdet:cpu-test, with --gpu localhost/hvd_megdet:gpu-test)
#   BASE_IMAGE     base image (default: localhost/debian:bookworm, made with debootstrap when missing)
#   DEBIAN_MIRROR  mirror for debootstrap (default: this machine's Debian mirror, else deb.debian.org)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VARIANT=cpu
case "${1:-}" in
    "") ;;
    --gpu) VARIANT=gpu ;;
    *) echo "usage: $0 [--gpu]" >&2; exit 2 ;;
esac
IMAGE=${IMAGE:-localhost/hvd_megdet:$VARIANT-test}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
# debootstrap's mirror: the first one of this machine's apt sources, else Debian's CDN.
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "build_image: $*" >&2; }
die() { say "error: $*"; exit 1; }
command -v podman >/dev/null || die "podman not found; see docker/README.md, \"Testing the image\""
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! podman image exists "$BASE_IMAGE"; then
    [ "$BASE_IMAGE" = localhost/debian:bookworm ] || die "base image $BASE_IMAGE not found"
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    say "making $BASE_IMAGE with debootstrap from $DEBIAN_MIRROR"
    debootstrap --variant=minbase bookworm "$TMP/rootfs" "$DEBIAN_MIRROR" >"$TMP/debootstrap.log" \
        || { tail -20 "$TMP/debootstrap.log" >&2; die "debootstrap failed"; }
    tar -C "$TMP/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$TMP/rootfs"
fi

# The host's effective pip settings (`pip config list`) go to $TMP/pip/pip.conf, which is mounted at
# /etc/xdg/pip (pip reads it there; no Debian package uses that path), with a copy of the CA bundle they name
# and, as read-only sub-mounts, the local folders they name (pip index pages link to ../../files, so a
# file:// index brings the folder above its simple/). All of it is gone after the build; the only trace in
# the image is the empty mount point /etc/xdg/pip.
mkdir "$TMP/pip"
mounts=(--volume "$TMP/pip:/etc/xdg/pip:ro")
while IFS= read -r mount; do
    mounts+=(--volume "$mount:ro")
done < <(python3 - "$TMP/pip" /etc/xdg/pip <<'EOF'
import os, shutil, subprocess, sys
conf_dir, mounted_at = sys.argv[1:]
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in sorted(listing.splitlines(), key=lambda l: l.startswith(":env:")):  # environment variables win
    key, _, value = line.partition("=")
    name = key.split(".", 1)[-1]
    if name in ("cert", "index-url", "extra-index-url", "find-links", "trusted-host", "default-timeout"):
        settings[name] = value.strip("'\"")
if "cert" in settings:
    shutil.copy(settings["cert"], os.path.join(conf_dir, "ca.crt"))
    settings["cert"] = os.path.join(mounted_at, "ca.crt")
folders = {}  # host folder -> its mount point in the build
for name in ("index-url", "extra-index-url", "find-links"):
    items = []
    for item in settings.get(name, "").split():
        path = item[len("file://"):] if item.startswith("file://") else item
        index = item.startswith("file://") and name.endswith("index-url")
        folder = os.path.dirname(path.rstrip("/")) if index else path
        if os.path.isabs(folder) and os.path.isdir(folder):
            sub = folders.setdefault(folder, f"local{len(folders)}")
            os.makedirs(os.path.join(conf_dir, sub), exist_ok=True)
            target = os.path.join(mounted_at, sub)
            item = f"file://{target}/{os.path.basename(path.rstrip('/'))}" if index else target
        items.append(item)
    if items:
        settings[name] = " ".join(items)
with open(os.path.join(conf_dir, "pip.conf"), "w") as f:
    f.write("[global]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items()))
print("\n".join(f"{folder}:{mounted_at}/{sub}" for folder, sub in folders.items()))
EOF
)
say "pip settings for the build: $(grep -v '^\[' "$TMP/pip/pip.conf" | tr '\n' ' ')"

# The GPU variant keeps the Dockerfile's defaults (NCCL, the documented architectures); the CPU one has no NCCL.
variant_args=()
[ "$VARIANT" = cpu ] && variant_args=(--build-arg HOROVOD_GPU_OPERATIONS=)
say "building $IMAGE ($VARIANT variant) on $BASE_IMAGE"
start=$SECONDS
podman build --format docker --pull=never -f "$ROOT/docker/Dockerfile" -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" "${variant_args[@]}" "${mounts[@]}" "$ROOT"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "ok: $IMAGE built in $((SECONDS - start)) s, $((size / 1000000)) MB"
