#!/usr/bin/env bash
# Builds and pushes the modules' container, then writes the released module templates with the image
# pinned by digest: every `${LORAFORGE_IMAGE_DIGEST}` in lilypad/*/lilypad_module.json.tmpl becomes
# the pushed image's sha256, so a module version always runs the exact container it was tested with.
#
#   lilypad/release.sh ghcr.io/loraforge/loraforge v0.1.0 [out-dir]      (default out-dir: dist/lilypad)
set -euo pipefail
repo=${1:?image repository, e.g. ghcr.io/loraforge/loraforge}
tag=${2:?tag, e.g. v0.1.0}
out=${3:-dist/lilypad}
root=$(cd "$(dirname "$0")/.." && pwd)

docker build -f "$root/lilypad/Dockerfile" -t "$repo:$tag" "$root"
docker push "$repo:$tag"
digest=$(docker inspect --format '{{index .RepoDigests 0}}' "$repo:$tag")
digest=${digest##*@sha256:}
[[ $digest =~ ^[0-9a-f]{64}$ ]] || { echo "no sha256 digest for $repo:$tag" >&2; exit 1; }

for module in "$root"/lilypad/*/lilypad_module.json.tmpl; do
    name=$(basename "$(dirname "$module")")
    mkdir -p "$out/$name"
    LORAFORGE_IMAGE_DIGEST=$digest envsubst '${LORAFORGE_IMAGE_DIGEST}' <"$module" >"$out/$name/lilypad_module.json.tmpl"
    sed -i "s#ghcr.io/loraforge/loraforge@#$repo@#" "$out/$name/lilypad_module.json.tmpl"
    echo "$out/$name/lilypad_module.json.tmpl: $repo@sha256:$digest"
done
