#!/usr/bin/env bash
# Install a headless browser for the HTML-rendering tests (tests/test_html_render.py).
#
# Installs the distribution's Chromium (/usr/bin/chromium) and the Python
# `playwright` package that drives it. Playwright's own browser download
# (`playwright install`) is deliberately NOT used: the tests launch the system
# Chromium through `executable_path` instead. Safe to run repeatedly; exits 0
# without doing anything when both are already present. Recommended packages
# (printer dialogs, notification daemon, ...) are skipped; a font is installed
# explicitly so that SVG text renders in screenshots.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
PYTHON=${PYTHON:-python3}  # the interpreter that runs the tests

if [[ -x "$CHROMIUM" ]]; then
    echo "chromium: already installed at $CHROMIUM"
else
    if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    echo "chromium: installing with apt-get"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends chromium fonts-dejavu-core
fi

if "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    echo "playwright: Python package already installed"
else
    echo "playwright: installing the Python package (no browser download)"
    "$PYTHON" -m pip install playwright
fi

# (stderr dropped: Debian's chromium wrapper script prints a harmless shell warning)
"$CHROMIUM" --version 2>/dev/null
