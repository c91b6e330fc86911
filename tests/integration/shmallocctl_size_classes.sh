#!/usr/bin/env bash
# shmallocctl size-classes must print exactly Go's table (the CSV's first five
# columns); --version must succeed and an unknown subcommand must exit 2.
# Usage: shmallocctl_size_classes.sh PATH/TO/shmallocctl PATH/TO/go-sizeclasses.csv
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SHMALLOCCTL CSV" >&2
  exit 2
fi
ctl=$1
csv=$2
[[ -x $ctl ]] || { echo "FAIL: $ctl is not executable" >&2; exit 1; }
[[ -r $csv ]] || { echo "FAIL: cannot read $csv" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# size-classes: exit 0 and output identical to the CSV without max_waste_pct.
rc=0
"$ctl" size-classes >"$tmp/got" 2>"$tmp/err" || rc=$?
[[ $rc -eq 0 ]] || fail "shmallocctl size-classes exited $rc: $(cat "$tmp/err")"
cut -d, -f1-5 "$csv" >"$tmp/want"
if ! diff -u "$tmp/want" "$tmp/got" >"$tmp/diff"; then
  fail "shmallocctl size-classes differs from cut -d, -f1-5 $csv:"
  cat "$tmp/diff" >&2
fi

# --version: exit 0, prints "shmallocctl <version>".
rc=0
"$ctl" --version >"$tmp/version" 2>&1 || rc=$?
[[ $rc -eq 0 ]] || fail "shmallocctl --version exited $rc"
grep -q '^shmallocctl [^ ]' "$tmp/version" || fail "shmallocctl --version printed: $(cat "$tmp/version")"

# Usage errors exit 2.
rc=0
"$ctl" bogus >/dev/null 2>&1 || rc=$?
[[ $rc -eq 2 ]] || fail "shmallocctl bogus exited $rc, want 2"
rc=0
"$ctl" >/dev/null 2>&1 || rc=$?
[[ $rc -eq 2 ]] || fail "shmallocctl with no subcommand exited $rc, want 2"

if [[ $failures -ne 0 ]]; then
  echo "shmallocctl_size_classes: $failures check(s) failed" >&2
  exit 1
fi
echo "shmallocctl_size_classes: OK"
