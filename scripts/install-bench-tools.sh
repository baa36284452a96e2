#!/bin/sh
# The benchmarks' outside load tools (`make bench-tools`, which `make bench` and `make test` run
# first): wrk (Debian package wrk) for the HTTP rows, and h2load (nghttp2-client) for the gRPC
# rows beside the project's own client. Installed with apt-get when missing and apt-get is here
# (with password-less sudo when not root). Anything else ends in a message and exit 0: the
# benchmarks run without them (HTTP load from an asyncio loop; no h2load rows), and their output
# and reports say which tool is missing and why.
set -u

say() { echo "bench-tools: $*"; }
without() { say "$1"; say "the benchmarks go on without: $MISSING (their reports say so)"; exit 0; }

MISSING=""
PACKAGES=""
command -v wrk >/dev/null 2>&1 || { MISSING="$MISSING wrk"; PACKAGES="$PACKAGES wrk"; }
command -v h2load >/dev/null 2>&1 || { MISSING="$MISSING h2load"; PACKAGES="$PACKAGES nghttp2-client"; }
if [ -z "$PACKAGES" ]; then
    say "wrk and h2load are installed ($(h2load --version 2>/dev/null | head -n 1))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    without "missing:$MISSING, and there is no apt-get here: install them with this system's package manager (Fedora: dnf install wrk nghttp2; macOS: brew install wrk nghttp2)"
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"  # never a password prompt: `make test` must not wait on a terminal
else
    without "missing:$MISSING; installing them needs root (apt-get install$PACKAGES): this user is not root and has no password-less sudo"
fi
say "missing:$MISSING: installing$PACKAGES with ${SUDO:+sudo }apt-get"
# shellcheck disable=SC2086 # the package list is meant to split
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $PACKAGES; then
    MISSING=""
    command -v wrk >/dev/null 2>&1 || MISSING="$MISSING wrk"
    command -v h2load >/dev/null 2>&1 || MISSING="$MISSING h2load"
    [ -z "$MISSING" ] && { say "installed$PACKAGES"; exit 0; }
fi
without "apt-get could not install$PACKAGES (see its output above)"
