#!/bin/sh
# Copies the repo's config.properties and fleet.yaml into k8s/base/files/, where the base
# kustomization's configMapGenerator reads them: kustomize refuses files outside the
# kustomization's own folder. Run it after `tsfleet config` (or any edit of fleet.yaml);
# tests/k8s fail, naming this script, while a copy differs from its original.
#
# One line differs in the pod's copy of config.properties: metrics_address binds TorchServe's
# metrics on every address of the pod (0.0.0.0), so that Prometheus can scrape them from its
# own pod (k8s/base/services.yaml, networkpolicy.yaml). Everything else stays as the repo has
# it, the inference and management listeners on loopback included; the tests allow exactly
# this difference.
set -eu
cd "$(dirname "$0")/.."
mkdir -p k8s/base/files
cp fleet.yaml k8s/base/files/fleet.yaml
echo "k8s: copied fleet.yaml to k8s/base/files/fleet.yaml"

if [ "$(grep -c '^metrics_address=http://127\.0\.0\.1:[0-9][0-9]*$' config.properties)" != 1 ]; then
    echo "k8s: config.properties has no single loopback metrics_address=http://127.0.0.1:PORT line;" \
         "nothing copied (the pod's copy rewrites that line)" >&2
    exit 1
fi
sed 's#^metrics_address=http://127\.0\.0\.1:\([0-9][0-9]*\)$#metrics_address=http://0.0.0.0:\1#' \
    config.properties > k8s/base/files/config.properties.tmp
mv k8s/base/files/config.properties.tmp k8s/base/files/config.properties
echo "k8s: copied config.properties to k8s/base/files/config.properties (metrics_address on 0.0.0.0)"
