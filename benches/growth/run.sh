#!/usr/bin/env bash
# Pauses while the store grows (issue 16): applies PRINCIPALS new principals
# to one source, RUNS times, and reports the slowest single applies (the
# fastest of the runs per insert position, so scheduler noise drops out and
# the store's own pauses stay; see examples/growth.rs).
#
#   bash benches/growth/run.sh                     # this checkout
#   BASE=c79ca0b bash benches/growth/run.sh         # and, side by side, a commit
#                                                   # from before gradual growth
#   PRINCIPALS=1000000 RUNS=5 bash benches/growth/run.sh
#
# In-process, no network; bounded by PRINCIPALS × RUNS. The BASE build uses a
# temporary worktree and its own target directory (target/growth-base).
set -euo pipefail
cd "$(dirname "$0")/../.."

PRINCIPALS=${PRINCIPALS:-2000000}
RUNS=${RUNS:-3}
BASE=${BASE:-}

run() { # label dir target-dir
  echo "== $1"
  (cd "$2" && CARGO_TARGET_DIR="$3" cargo build --release --quiet --example growth)
  "$3/release/examples/growth" "$PRINCIPALS" "$RUNS" | sed "s/^RESULT growth/RESULT growth build=$1/"
}

if [ -n "$BASE" ]; then
  base_dir=$(mktemp -d)
  trap 'git worktree remove --force "$base_dir" >/dev/null 2>&1 || rm -rf "$base_dir"' EXIT
  git worktree add --detach --quiet "$base_dir" "$BASE"
  # The example may postdate BASE: the same measurement, on BASE's store.
  cp examples/growth.rs "$base_dir/examples/growth.rs"
  run "base-$BASE" "$base_dir" "$PWD/target/growth-base"
fi
run "head-$(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')" . "$PWD/target"
