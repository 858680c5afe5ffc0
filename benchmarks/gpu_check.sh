#!/usr/bin/env bash
# Issue 18's GPU check in one go: the CUDA tests, then the throughput rows (ours eager / compiled / HF
# Trainer compiled at 140m; 950m; document-masked vs causal and flex vs sdpa at 140m; a profile of 140m),
# each under its own `timeout` so one failure or hang keeps the others. Writes one JSON (default
# gpu_check.json) with every row's figures or its exit status. Budget: about 8 minutes on one H200.
# `--device cpu` shrinks every shape (micro preset, short rows) so the same script runs in minutes on a CPU.
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--out FILE]
set -u
DEVICE=cuda
OUT=gpu_check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
ROWS="$(mktemp -d)"
trap 'rm -rf "$ROWS"' EXIT

if [ "$DEVICE" = cuda ]; then
  SMALL="--preset 140m --vocab-size 128256 --seq-len 2048 --micro-batch 16 --steps 12"
  BIG="--preset 950m --vocab-size 128256 --seq-len 2048 --micro-batch 8 --steps 8"
  T_ROW=100; T_TEST=120
else
  SMALL="--preset micro --vocab-size 49152 --seq-len 128 --micro-batch 2 --steps 3"
  BIG="--preset tiny --vocab-size 49152 --seq-len 128 --micro-batch 2 --steps 3"
  T_ROW=240; T_TEST=120  # compiling both sides on 2 shared cores takes minutes
fi

# row NAME TIMEOUT ARGS...: one benchmark run; its JSON (or its failure) lands in $ROWS/NAME.json
row() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  timeout "$limit" "$PY" benchmarks/train_throughput.py --device "$DEVICE" --json "$@" \
    > "$ROWS/$name.out" 2> "$ROWS/$name.err"
  local rc=$?
  "$PY" - "$name" "$rc" "$((SECONDS - t0))" "$ROWS" <<'PYEOF'
import json, sys
from pathlib import Path
name, rc, secs, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
lines = (rows / f"{name}.out").read_text().strip().splitlines()
row = {"rc": rc, "seconds": secs}
try:
    row["result"] = json.loads(lines[-1])
except (IndexError, json.JSONDecodeError):
    row["error_tail"] = (rows / f"{name}.err").read_text()[-1500:]
(rows / f"{name}.json").write_text(json.dumps(row))
PYEOF
  echo "row $name: rc $rc in $((SECONDS - t0)) s" >&2
}

# The CUDA tests (flex step == dense-mask step, autocast/compile paths); on CPU they skip.
t0=$SECONDS
timeout "$T_TEST" "$PY" -m pytest -q tests/test_cuda.py tests/test_flex_attention.py > "$ROWS/tests.log" 2>&1
echo "{\"rc\": $?, \"seconds\": $((SECONDS - t0)), \"summary\": $("$PY" -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip().splitlines()[-1]))' "$ROWS/tests.log")}" > "$ROWS/tests.json"

row 140m_eager_vs_hf          "$T_ROW" $SMALL
row 140m_compiled_vs_hf       "$T_ROW" $SMALL --compile
row 140m_compiled_docmask_sdpa "$T_ROW" $SMALL --compile --doc-mask --attn sdpa --ours-only
if [ "$DEVICE" = cuda ]; then
  row 140m_compiled_docmask_flex "$T_ROW" $SMALL --compile --doc-mask --attn flex --ours-only
else  # torch 2.13 has no FlexAttention backward on CPU (eager or compiled): nothing to time here
  echo '{"rc": null, "skipped": "FlexAttention has no CPU backward in torch 2.13"}' > "$ROWS/140m_compiled_docmask_flex.json"
fi
row 950m_compiled             "$T_ROW" $BIG --compile --ours-only
row 140m_profile_eager        "$T_ROW" ${SMALL/--steps 12/--steps 3} --profile --ours-only

"$PY" - "$ROWS" "$OUT" "$DEVICE" <<'PYEOF'
import json, sys
from pathlib import Path
rows, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = {"device": device, "rows": {p.stem: json.loads(p.read_text()) for p in sorted(rows.glob("*.json"))}}
def tps(name, key="ours_tokens_per_s"):
    r = res["rows"].get(name, {}).get("result") or {}
    return r.get(key)
causal, masked, flex = tps("140m_compiled_vs_hf"), tps("140m_compiled_docmask_sdpa"), tps("140m_compiled_docmask_flex")
res["summary"] = {
    "140m_eager_ratio_vs_hf": (res["rows"].get("140m_eager_vs_hf", {}).get("result") or {}).get("ratio"),
    "140m_compiled_ratio_vs_hf_compiled": (res["rows"].get("140m_compiled_vs_hf", {}).get("result") or {}).get("ratio"),
    "140m_compiled_mfu": tps("140m_compiled_vs_hf", "ours_mfu"),
    "950m_compiled_mfu": tps("950m_compiled", "ours_mfu"),
    "docmask_sdpa_cost_vs_causal": round(1 - masked / causal, 4) if causal and masked else None,
    "docmask_flex_cost_vs_causal": round(1 - flex / causal, 4) if causal and flex else None,
}
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res["summary"]))
PYEOF
echo "wrote $OUT" >&2
