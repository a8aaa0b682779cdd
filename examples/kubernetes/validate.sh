#!/usr/bin/env bash
# Validates every manifest here offline against the Kubernetes API schemas (kubernetes-validate,
# strict: unknown fields are errors). kustomization.yaml files are kustomize's, not API objects,
# and are checked for their resource lists only.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
"$py" -c "import kubernetes_validate" 2>/dev/null || "$py" -m pip install -q kubernetes-validate >/dev/null
files=$(find . -name '*.yaml' ! -name kustomization.yaml | sort)
"$py" -m kubernetes_validate --strict --quiet $files
for k in $(find . -name kustomization.yaml); do
    d=$(dirname "$k")
    for r in $(sed -n 's/^  - //p' "$k"); do
        [ -e "$d/$r" ] || { echo "$k names $r, which does not exist" >&2; exit 1; }
    done
done
echo "kubernetes manifests: $(echo $files | wc -w) valid"
