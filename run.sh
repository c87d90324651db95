#!/usr/bin/env bash
# Set up (first run only) and start FOD Inspector on http://127.0.0.1:8501 (bundled sample data, offline).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/streamlit run app.py "$@"
