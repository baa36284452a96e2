#!/bin/sh
# The speed suite's outside load tool (`make bench-tools`, which `make bench` and `make test` run first):
# h2load, from the Debian/Ubuntu package nghttp2-client, for the gRPC rows beside the project's
# own client. Installed with apt-get when it is missing and apt-get is here (with sudo when not
# root). Anything else ends in a message and exit 0: the benchmark runs without h2load, and its
# output and report say that the h2load rows are missing and why.
set -u

say() { echo "bench-tools: $*"; }
without() { say "$1"; say "make bench goes on without h2load: its gRPC rows from h2load will be missing, and the report says so"; exit 0; }

if command -v h2load >/dev/null 2>&1; then
    say "h2load is installed ($(h2load --version 2>/dev/null | head -n 1))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    without "h2load is missing and there is no apt-get here: install nghttp2's h2load with this system's package manager (Fedora: dnf install nghttp2; macOS: brew install nghttp2)"
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"  # never a password prompt: `make test` must not wait on a terminal
else
    without "h2load is missing, and installing it needs root (apt-get install nghttp2-client): this user is not root and has no password-less sudo"
fi
say "h2load is missing: installing nghttp2-client with ${SUDO:+sudo }apt-get"
if $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nghttp2-client && command -v h2load >/dev/null 2>&1; then
    say "installed $(h2load --version 2>/dev/null | head -n 1)"
else
    without "apt-get could not install nghttp2-client (see its output above)"
fi
