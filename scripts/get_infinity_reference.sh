#!/usr/bin/env bash
# Put FoundationVision/Infinity's `infinity/` package (the code that benchmarks/bench_reference_sampler.py times) into
# third_party/infinity/infinity/. The folder is git-ignored and never committed; it is small enough (about 0.3 MB) to
# travel with the working tree to a machine without internet.
#
# Usage (from the repository root):
#   INFINITY_GIT=/path/to/Infinity/.git bash scripts/get_infinity_reference.sh   # a local clone or bare git dir
#   bash scripts/get_infinity_reference.sh                                       # clones it (needs internet)
# INFINITY_REV picks the commit (default HEAD); DEST the target folder (default third_party/infinity).
set -euo pipefail

DEST=${DEST:-third_party/infinity}
REV=${INFINITY_REV:-HEAD}
URL=${INFINITY_URL:-https://github.com/FoundationVision/Infinity.git}

if [[ -z "${INFINITY_GIT:-}" ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    git clone --quiet --bare --filter=blob:none "$URL" "$tmp/infinity.git"
    INFINITY_GIT="$tmp/infinity.git"
fi
if ! git --git-dir="$INFINITY_GIT" rev-parse --verify --quiet "$REV^{commit}" >/dev/null; then
    echo "error: $INFINITY_GIT has no commit $REV (set INFINITY_GIT to a clone of FoundationVision/Infinity)" >&2
    exit 1
fi
commit=$(git --git-dir="$INFINITY_GIT" rev-parse "$REV^{commit}")

rm -rf "$DEST"
mkdir -p "$DEST"
git --git-dir="$INFINITY_GIT" archive "$commit" infinity LICENSE | tar -x -C "$DEST"
echo "$commit" > "$DEST/COMMIT"
echo "FoundationVision/Infinity $commit -> $DEST ($(du -sh "$DEST" | cut -f1))"
