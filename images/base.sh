#!/usr/bin/env bash
# Builds the local Debian base image that `make images` builds kubetune's images on (no registry
# can be pulled from here): a root filesystem made by mmdebstrap from Debian packages, imported
# into podman. Cached by its inputs: the tarball lives in ~/.cache/kubetune/images/ under a name
# that hashes the suite, mirror, packages and this script, so a change to any of them rebuilds it.
#
#   images/base.sh            # prints the image reference, e.g. localhost/kubetune-base:bookworm-1a2b3c4d5e6f
set -euo pipefail

SUITE=${KUBETUNE_BASE_SUITE:-bookworm}
MIRROR=${KUBETUNE_BASE_MIRROR:-http://deb.debian.org/debian}
# python3 and its venv module (the images' /opt/venv), CA certificates for the pip/uv downloads.
PACKAGES=${KUBETUNE_BASE_PACKAGES:-python3,python3-venv,ca-certificates}
CACHE=${KUBETUNE_IMAGES_CACHE:-$HOME/.cache/kubetune/images}

key=$( { echo "$SUITE $MIRROR $PACKAGES"; cat "$0"; } | sha256sum | cut -c1-12)
ref=localhost/kubetune-base:$SUITE-$key
tarball=$CACHE/base-$SUITE-$key.tar

if podman image exists "$ref"; then echo "$ref"; exit 0; fi
mkdir -p "$CACHE"
if [ ! -s "$tarball" ]; then
  echo "Building the Debian base $ref with mmdebstrap ($SUITE: $PACKAGES)" >&2
  # Documentation, man pages and translations only make the base bigger.
  mmdebstrap --variant=minbase --format=tar --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "$SUITE" "$tarball.part" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" >&2
  mv "$tarball.part" "$tarball"
fi
podman import --quiet \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
  "$tarball" "$ref" >/dev/null
echo "$ref"
