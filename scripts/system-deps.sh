#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, where apt is available.
# Fashion-MNIST: dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist).
# Chromium: the report-page test drives it headless (never a downloaded browser).
# nginx: the fail-over test runs it in front of three replicas (deploy/nginx).
set -u
want=(dataset-fashion-mnist)
[ "${1:-}" = demo ] || want+=(chromium nginx)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: no apt-get here; ${missing[*]} not installed (tests that need them skip)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
echo "system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq >/dev/null 2>&1 || true
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
  || echo "system-deps: could not install ${missing[*]} (tests that need them skip)" >&2
exit 0
