#!/bin/sh
# Copies the repo's config.properties and fleet.yaml into k8s/base/files/, where the base
# kustomization's configMapGenerator reads them: kustomize refuses files outside the
# kustomization's own folder. Run it after `tsfleet config` (or any edit of fleet.yaml);
# tests/k8s fail, naming this script, while a copy differs from its original.
set -eu
cd "$(dirname "$0")/.."
mkdir -p k8s/base/files
for f in config.properties fleet.yaml; do
    cp "$f" "k8s/base/files/$f"
    echo "k8s: copied $f to k8s/base/files/$f"
done
