"""Fuzz campaign: mutated models x command lines against posrewrite's contract (README, "Reliability").

Each case writes a seeded mutant of a tiny RoPE model (external data beside it, a secret file one folder up),
runs one command line from fixtures.hostile.ARG_LISTS in-process, and checks: a documented exit code (never 1),
no traceback, exactly one ``posrewrite: error:`` line on failure and nothing on stderr on success, no raw
control characters, the input folder unchanged, no output left after a failure, and the secret never copied.

    python benchmarks/fuzz_campaign.py --seconds 300 [--start-seed 0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures import hostile  # noqa: E402

SECRET = b"SECRET-0123456789abcdef"


def one_case(root: Path, seed: int, rounds: int) -> tuple[int, list[str], str]:
    case = root / f"case{seed}"
    model_dir = case / "model"
    base = hostile.save(hostile.rope_proto(weight_elems=64), model_dir / "model.onnx", external=True)
    (case / "secret.bin").write_bytes(SECRET * 4)
    base.write_bytes(hostile.mutate(base.read_bytes(), seed, rounds=rounds))
    out_dir = case / "out"
    out_dir.mkdir()
    args = hostile.ARG_LISTS[seed % len(hostile.ARG_LISTS)]
    if args[0] == "{model}" and seed % 3 == 0:  # a rewrite: hostile flag values too
        rng = random.Random(seed)
        args = args + hostile.fill_extra([(rng.choice(sorted(hostile.FLAG_VALUES)), rng.randrange(20))
                                          for _ in range(rng.randrange(1, 3))])
    argv = hostile.fill_args(args, model=base, out=out_dir / "out.onnx", missing=case / "nowhere" / "out.onnx")
    before = hostile.tree_digest(model_dir)
    run = hostile.run_cli(argv)
    after = hostile.tree_digest(model_dir)
    written = sorted(p.name for p in out_dir.iterdir())
    problems = hostile.contract_violations(run, before=before, after=after, out_files=written)
    for p in out_dir.iterdir():
        if SECRET in p.read_bytes():
            problems.append(f"secret copied into {p.name}")
    if (case / "nowhere").exists():
        problems.append("missing output folder was created")
    shutil.rmtree(case, ignore_errors=True)
    return run.code, problems, " ".join(argv[:1] + argv[2:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--start-seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="mutations per model")
    args = ap.parse_args()
    codes: collections.Counter[int] = collections.Counter()
    failures = []
    t0 = time.monotonic()
    seed = args.start_seed
    with tempfile.TemporaryDirectory(prefix="posrewrite-fuzz-") as tmp:
        while time.monotonic() - t0 < args.seconds:
            code, problems, what = one_case(Path(tmp), seed, args.rounds)
            codes[code] += 1
            if problems:
                failures.append((seed, what, problems))
                print(f"seed {seed}: {what}: {'; '.join(problems)}"[:400], flush=True)
            seed += 1
    total = sum(codes.values())
    print(f"{total} cases in {time.monotonic() - t0:.0f} s (seeds {args.start_seed}..{seed - 1}, "
          f"{args.rounds} mutation(s) each); exit codes: {dict(sorted(codes.items()))}")
    print(f"contract violations: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
