#!/usr/bin/env bash
# Resolver check of every GPU extra: `pip install --dry-run --ignore-installed .[EXTRA]` in a throw-away venv
# (metadata only, nothing is installed). Fails when an extra stops resolving.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
for extra in gpu sglang; do
  start=$SECONDS
  if ! "$tmp/venv/bin/python" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/$extra.json" \
      ".[$extra]" >"$tmp/$extra.log" 2>&1; then
    grep -v "^WARNING: Location" "$tmp/$extra.log" | tail -30
    echo "extra [$extra]: does NOT resolve"
    exit 1
  fi
  pins=$("$tmp/venv/bin/python" -c "
import json, sys
names = {'verl', 'vllm', 'sglang', 'torch', 'transformers', 'atroposlib'}
items = json.load(open(sys.argv[1]))['install']
print(' '.join(sorted(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in items
                      if i['metadata']['name'].lower() in names)))" "$tmp/$extra.json")
  echo "extra [$extra] resolves in $((SECONDS - start)) s: $pins"
done
