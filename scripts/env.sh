# Environment for running collabedit offline (source it): data beside the repo, Flower quiet.
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COLLABEDIT_DATA="${COLLABEDIT_DATA:-$(cd "$_here/.." && pwd)/shared/data}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
export COLLABEDIT_RESULTS="${COLLABEDIT_RESULTS:-$_here/results/runs}"
export PATH="$_here/.venv/bin:$PATH"
