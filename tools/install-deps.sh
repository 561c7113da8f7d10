#!/usr/bin/env bash
# tools/install-deps.sh — installs the Debian packages and npm test clients
# d2od needs, only when something is missing. Called by `make run`/`make test`.
set -euo pipefail
pkgs=(build-essential pkg-config libjansson-dev libmicrohttpd-dev libuv1-dev libcurl4-openssl-dev libssl-dev libcairo2-dev fonts-dejavu-core python3 nodejs npm)
# The web page's end-to-end test drives Debian's Chromium (tests/integration/test_ui.py);
# only the tests need it.
[ "${1:-}" = "--test" ] && pkgs+=(chromium)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node may come from elsewhere than Debian (as on the dev image): accept any node >= 20 with npm.
if command -v node >/dev/null && command -v npm >/dev/null; then
  tmp=(); for p in "${missing[@]}"; do [[ "$p" == nodejs || "$p" == npm ]] || tmp+=("$p"); done
  missing=("${tmp[@]+"${tmp[@]}"}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# JavaScript test clients (the HF tokenizer oracle, the OpenAI client, playwright-core), pinned in tests/js;
# only for the tests (`make test` passes --test).
# (again whenever the lock file is newer than the last install, e.g. a package was added)
if [ "${1:-}" = "--test" ] && [ -f tests/js/package.json ] && { [ ! -d tests/js/node_modules ] ||
     [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; }; then
  echo "install-deps: npm install in tests/js"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error || npm install --no-audit --no-fund --loglevel=error) \
    || echo "install-deps: npm install failed; the JavaScript client tests will be skipped"

fi
