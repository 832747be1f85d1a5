"""Writes tests/slow_tests.txt from measured durations, by the rule in tests/conftest.py's docstring.

    POSREWRITE_SLOW=1 python -m pytest --durations=0 --durations-min=0 -q -p no:cacheprovider > durations.txt
    python -m pytest -m "not slow" --durations=0 --durations-min=0 -q -p no:cacheprovider > check.txt
    python tests/slow_list.py durations.txt check.txt [--threshold 0.5]

A test is listed when its setup + call + teardown took more than the threshold (seconds, default 0.5), unless
it is in KEEP. A test
function all of whose parameter sets are listed is written once, by its function id. Tests already marked slow
in their file are left there. Review the diff: a new entry means a test became slow, a vanished one that it
became fast.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")
#: tests kept in `make check` although measured above the threshold: the cheapest test that runs a module no fast
#: test reaches (tests/conftest.py, --every-module)
KEEP = {
    "tests/test_ops_rope.py::test_onnx_export_to_rotary_embedding[com.microsoft-True-1-True]",  # ops.rope_onnx
    "tests/test_ops_rope.py::test_triton_kernel_in_interpreter",  # ops.rope_triton (in a child process)
    "tests/test_fx_modules.py::test_alibi_detected_in_bloom",  # passes.fx.detect_alibi
    "tests/test_fx_modules.py::test_fp32_positions_fixes_half_precision_angles",  # passes.fx.fp32_positions
    "tests/test_fx_modules.py::test_spellings_detect_rescale_and_fuse[sub-True]",  # passes.fx.fuse_rope
    "tests/test_fuse_attention.py::test_mask_probe_tells_causal_from_sliding",  # passes.onnx.attention.fuse
    "tests/test_attention_extend.py::test_hf_prefill_matches_paper_reference[mistral-leaky-rerope-dynamo]",  # .extend
    "tests/test_olive.py::test_pass_on_a_model_builder_folder",  # olive
    "tests/test_rope_third_party.py::test_xpos_check_reports_the_fp16_overflow",  # passes.onnx.rope.xpos
    "tests/test_rope_angles.py::test_timm_axial_detected_as_2d",  # math.rope_grid, sites.rope_axes
    "tests/test_other_detect.py::test_t5_bias[kw0]",  # passes.onnx.t5.detect, sites.t5
    "tests/test_fuse_decode.py::test_gqa_only_where_the_bias_masks_the_future[True]",  # attention.fuse_cache, cache_*
}

HEADER = """\
# Tests marked slow by measurement (tests/conftest.py applies the mark; the rule is in its docstring).
# Regenerate with tests/slow_list.py from `POSREWRITE_SLOW=1 pytest --durations=0` on a warm fixture cache.
# One node id a line (a function id covers all its parameters); after '#': the seconds measured.
"""


def durations(text: str) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            total[m.group(3)] += float(m.group(1))
    return dict(total)


def slow_entries(total: dict[str, float], all_ids: list[str], threshold: float) -> list[tuple[str, float]]:
    slow = {k: v for k, v in total.items() if v > threshold and k not in KEEP}
    by_function: dict[str, list[str]] = defaultdict(list)
    for nodeid in all_ids:
        by_function[nodeid.split("[", 1)[0]].append(nodeid)
    out: list[tuple[str, float]] = []
    done: set[str] = set()
    for function, ids in by_function.items():
        if "[" in ids[0] and len(ids) > 1 and all(i in slow for i in ids):
            out.append((function, sum(slow[i] for i in ids)))
            done.update(ids)
    out += [(k, v) for k, v in slow.items() if k not in done]
    return sorted(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("durations", type=Path, nargs="+",
                        help="outputs of pytest --durations=0 (the whole suite; also `make check`'s own, where a test "
                             "pays for fixtures that slow tests built before): the largest time of each test counts")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("slow_tests.txt"))
    args = parser.parse_args()
    total: dict[str, float] = {}
    for path in args.durations:
        for k, v in durations(path.read_text(encoding="utf-8")).items():
            total[k] = max(v, total.get(k, 0.0))
    entries = slow_entries(total, sorted(total), args.threshold)
    width = max((len(e) for e, _ in entries), default=0)
    body = "".join(f"{e:{width}}  # {v:.1f} s\n" for e, v in entries)
    args.output.write_text(HEADER + body, encoding="utf-8")
    slow_s = sum(v for _, v in entries)
    print(f"{len(entries)} entries ({slow_s:.0f} s of {sum(total.values()):.0f} s) -> {args.output}")


if __name__ == "__main__":
    main()
