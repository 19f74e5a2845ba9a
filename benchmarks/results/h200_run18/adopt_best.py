"""H200 runs 18-19: add to the word kernel's strip configs the `--extra` candidate of
bench_overlap_configs.py that beat every tuned config at a shape by at least MARGIN (plain calls,
"alone", on the random masks bench_kernels.py uses) and is no slower back to back than the best
of them (a condition added after run 19, whose copy of this script adopted a config on alone
timings that were all off), by editing kernels/overlap.py of the device's
copy of the tree. Prints the decision per shape and writes the change as a unified diff.

    python3 adopt_best.py OVERLAP_CONFIGS_JSON KERNELS_OVERLAP_PY DIFF_OUT
"""

import ast
import difflib
import json
import sys
from pathlib import Path

MARGIN = 0.01  # an extra must be at least 1% faster than the best tuned config
# the strip entries of _WORD_CONFIGS: a tuple list after this line, closed by "))])" (run 18 looked
# for its last entry, "(2048, 32, 2, 4, 0))])"; run 19 ran a copy looking for "(2048, 16, 0, 4, 0))])")
STRIP_LIST = "for tile, strip_rows, prefetch, warps, stream in ("


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
        # and no slower back to back than the best tuned config there: alone timings can all be
        # off in one run (run 19's 1024 x 1024 random masks), back-to-back ones less so
        if any(row["back_to_back_ms"] is None for row in tuned + [best_extra]):
            raise SystemExit(f"adopt_best: {shape} has no back-to-back timings (a --cpu-smoke result?)")
        best_together = min(row["back_to_back_ms"] for row in tuned)
        together_ok = best_extra["back_to_back_ms"] <= best_together
        adopt = gain >= MARGIN and together_ok
        verdict = "adopt" if adopt else "keep the tuned configs"
        print(f"{shape}: best tuned {best_tuned['config']} {best_tuned['alone_ms']:.4f} ms "
              f"({best_tuned['alone_pct_copy']:.1f}%); best extra {best_extra['config']} "
              f"{best_extra['alone_ms']:.4f} ms ({best_extra['alone_pct_copy']:.1f}%): {100 * gain:+.1f}%; "
              f"back to back {best_extra['back_to_back_ms']:.4f} against {best_together:.4f} ms -> {verdict}")
        if adopt and strip_tuple(best_extra["config"]) not in adopted:
            adopted.append(strip_tuple(best_extra["config"]))
    before = source_path.read_text()
    start = before.find(STRIP_LIST)
    end = before.find("))])", start)
    if start < 0 or end < 0:
        raise SystemExit(f"adopt_best: the strip list ({STRIP_LIST!r} ... '))])') not found in {source_path}")
    after = before[:end + 1] + "".join(f", {entry}" for entry in adopted) + before[end + 1:]
    source_path.write_text(after)
    diff_path.write_text("".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                                      "a/kernels/overlap.py", "b/kernels/overlap.py")))
    print(f"adopted: {adopted or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
