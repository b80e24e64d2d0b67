#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test: protoc (for the envelope), kcat,
# openssl (the local PostgreSQL's TLS certificates), and checks for Java, Maven and cargo.
# PostgreSQL is installed by stack.sh when missing.
set -euo pipefail
say() { printf '[deps] %s\n' "$*"; }
missing=()
command -v protoc >/dev/null 2>&1 || [ -n "${PROTOC:-}" ] || missing+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
# The hostile-input tests send raw bytes (header names that are not UTF-8) with kcat.
command -v kcat >/dev/null 2>&1 || missing+=(kcat)
# stack.sh makes the local PostgreSQL's TLS certificates with openssl.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "error: missing ${missing[*]} and apt-get is not available to install them"; exit 1
  fi
  say "installing ${missing[*]} from Debian's packages"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { say "error: cargo is missing; install Rust (rustup)"; exit 1; }
say "build dependencies present"
