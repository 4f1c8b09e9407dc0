#!/usr/bin/env bash
# A local stand-in for the image's base (python:3.11-slim-bookworm) where Docker Hub cannot be
# reached: Debian bookworm (minbase) with its own Python 3.11 and venv, from a Debian mirror,
# imported into the local Docker. Needs root and debootstrap. With Docker Hub, skip this.
#   deploy/standin-base.sh [TAG]     then  docker build --build-arg BASE_IMAGE=TAG ...
set -euo pipefail
tag=${1:-yolov1-base:py3.11-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$tag" >/dev/null
echo "$tag: $(docker run --rm "$tag" python3 --version)"
