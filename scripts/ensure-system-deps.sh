#!/usr/bin/env bash
# Installs the Debian packages that tests and benchmarks run for real, when they are missing.
# Needs root (CI and the dev machines run as root); prints what it does.
#
# prometheus (prometheus, promtool) and prometheus-alertmanager (alertmanager, amtool) check and run
# deploy/prometheus and deploy/alertmanager in the tests. Their packages start and enable services on ports
# 9090 and 9093; the tests start their own instances on free ports, so services are kept from starting
# (a policy-rc.d that denies, unless one is already in place) and disabled afterwards.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
{ command -v prometheus-alertmanager && command -v amtool; } >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# Throwaway Redis and PostgreSQL servers (tests that restart them, the soak) run these binaries themselves.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
# The console's browser test (tests/component/test_console_browser.py) drives Debian's Chromium with Playwright.
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]} — install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]} (services not started) …" >&2
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
for service in "${need[@]}"; do  # only what was installed now: never the machine's own running services
  case "$service" in prometheus|prometheus-alertmanager|redis-server|postgresql) ;; *) continue ;; esac
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$service" >/dev/null 2>&1 || true; fi
  if command -v update-rc.d >/dev/null 2>&1; then update-rc.d "$service" disable >/dev/null 2>&1 || true; fi
done
