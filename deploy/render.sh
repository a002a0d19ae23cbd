#!/usr/bin/env bash
# Regenerate deploy/crds.yaml and deploy/flotilla.yaml from charts/flotilla (default
# values, release "flotilla" in namespace flotilla-system). tests/e2e/test_chart.py checks
# that the committed files are current; run this after changing the chart.
#   deploy/render.sh [OUTDIR]   (default: deploy/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-deploy}
HELM=${HELM:-$(scripts/e2e-tools.sh --print)/helm}
{
    echo "# Flotilla CRDs (generated from charts/flotilla/crds by deploy/render.sh)."
    for f in charts/flotilla/crds/*.yaml; do
        echo "---"
        cat "$f"
    done
} >"$out/crds.yaml"
{
    echo "# Flotilla, rendered with default values (deploy/render.sh); CRDs: deploy/crds.yaml."
    "$HELM" template flotilla charts/flotilla --namespace flotilla-system --kube-version 1.36.1
} >"$out/flotilla.yaml"
