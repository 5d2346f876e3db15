#!/usr/bin/env bash
# Set up lafid on a fresh Debian/Ubuntu machine with Python 3.10-3.12:
# system tools (ffmpeg, espeak-ng, chromium), a .venv, and every Python dependency.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v chromium >/dev/null || missing+=(chromium)   # the report test renders the HTML report headless
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: please install ${missing[*]} (speech tests need espeak-ng, report tests chromium)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[curate,train,dev]'
# See the file for why these two are installed without their declared requirements.
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -c "import mediapipe, cv2, numpy; assert mediapipe.solutions.face_mesh; print('lafid environment ready: numpy', numpy.__version__, 'opencv', cv2.__version__)"
