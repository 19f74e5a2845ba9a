"""H200 run 18: add to the word kernel's strip configs the `--extra` candidate of
bench_overlap_configs.py that beat every tuned config at a shape by at least MARGIN (plain calls,
"alone", on the random masks bench_kernels.py uses), by editing kernels/overlap.py of the device's
copy of the tree. Prints the decision per shape and writes the change as a unified diff.

    python3 adopt_best.py OVERLAP_CONFIGS_JSON KERNELS_OVERLAP_PY DIFF_OUT
"""

import ast
import difflib
import json
import sys
from pathlib import Path

MARGIN = 0.01  # an extra must be at least 1% faster than the best tuned config
LAST_STRIP = "(2048, 32, 2, 4, 0))])"


def strip_tuple(name: str) -> tuple:
    """"{'TILE': 2048, 'STRIP_ROWS': 32, 'PREFETCH': 2, 'STREAM': True} warps=4" -> (2048, 32, 2, 4, 1)"""
    meta_text, warps_text = name.rsplit(" warps=", 1)
    meta = ast.literal_eval(meta_text)
    return (meta["TILE"], meta["STRIP_ROWS"], meta["PREFETCH"], int(warps_text), int(bool(meta.get("STREAM"))))


def main() -> int:
    result_path, source_path, diff_path = (Path(arg) for arg in sys.argv[1:4])
    rows = [row for row in json.loads(result_path.read_text())["rows"] if row["masks"] == "random"]
    adopted = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        tuned = [row for row in rows if row["shape"] == shape and row["origin"] == "tuned"]
        extras = [row for row in rows if row["shape"] == shape and row["origin"] == "extra"]
        if not tuned or not extras:
            print(f"{shape}: no decision ({len(tuned)} tuned rows, {len(extras)} extra rows)")
            continue
        best_tuned = min(tuned, key=lambda row: row["alone_ms"])
        best_extra = min(extras, key=lambda row: row["alone_ms"])
        gain = 1 - best_extra["alone_ms"] / best_tuned["alone_ms"]
        verdict = "adopt" if gain >= MARGIN else "keep the tuned configs"
        print(f"{shape}: best tuned {best_tuned['config']} {best_tuned['alone_ms']:.4f} ms "
              f"({best_tuned['alone_pct_copy']:.1f}%); best extra {best_extra['config']} "
              f"{best_extra['alone_ms']:.4f} ms ({best_extra['alone_pct_copy']:.1f}%): {100 * gain:+.1f}% -> {verdict}")
        if gain >= MARGIN and strip_tuple(best_extra["config"]) not in adopted:
            adopted.append(strip_tuple(best_extra["config"]))
    before = source_path.read_text()
    if LAST_STRIP not in before:
        raise SystemExit(f"adopt_best: {LAST_STRIP!r} not found in {source_path}")
    after = before.replace(LAST_STRIP, LAST_STRIP[:-3] + "".join(f", {entry}" for entry in adopted) + ")])")
    source_path.write_text(after)
    diff_path.write_text("".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                                      "a/kernels/overlap.py", "b/kernels/overlap.py")))
    print(f"adopted: {adopted or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
