#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test: protoc (for the envelope), kcat,
# openssl (the local PostgreSQL's TLS certificates), Chromium, Node.js, playwright-core
# and axe-core (the console's browser test and its accessibility audit), and checks for
# Java, Maven and cargo. PostgreSQL is installed by stack.sh when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
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
# The console's test (tests/console.rs) drives Debian's Chromium with playwright-core.
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "error: missing ${missing[*]} and apt-get is not available to install them"; exit 1
  fi
  say "installing ${missing[*]} from Debian's packages"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# playwright-core and axe-core, pinned by tests/console/package-lock.json (no browser
# download: playwright-core drives /usr/bin/chromium).
if [ ! -f tests/console/node_modules/playwright-core/package.json ] || [ ! -f tests/console/node_modules/axe-core/axe.min.js ]; then
  say "installing playwright-core and axe-core into tests/console/node_modules"
  (cd tests/console && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
command -v cargo >/dev/null 2>&1 || { say "error: cargo is missing; install Rust (rustup)"; exit 1; }
say "build dependencies present"
