"""GPU benchmark of the fused RoPE op (`torch.ops.posrewrite.rope_qk`, Triton) against a plain copy.

For every model shape (7B-70B attention geometry), phase (prompt, decode) and dtype (fp16, bf16) it
times, with CUDA events (median of many runs after warm-up):

- copy:        ``dst.copy_(src)`` of as many bytes as the fused op reads and writes (the ceiling),
- fused:       ``rope_qk`` with half-form cos/sin tables (what the fx fusion inserts),
- fused_freqs: ``rope_qk_freqs``, angles computed in the kernel from positions and inv_freq,
- eager:       the HF formula ``q*cos + rotate_half(q)*sin`` (and the same for k) in eager torch,
- compiled:    that formula under ``torch.compile``,
- liger / flash_attn: their RoPE kernels when those packages are installed.

Bandwidth = bytes the fused op must move / time; the report gives each variant's bandwidth and the fused
kernel's share of the copy bandwidth (goal: >= 85%).

    python benchmarks/rope_kernel_gpu.py [--dtypes fp16,bf16] [--models 7b,70b] [--json out.json]

Exits with a message (status 0) when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {  # name: (q heads, kv heads, head_dim)
    "7b": (32, 32, 128),
    "8b": (32, 8, 128),
    "13b": (40, 40, 128),
    "70b": (64, 8, 128),
}
PHASES = {  # name: (batch, seq)
    "prompt": (1, 4096),
    "prompt-b8": (8, 1024),
    "decode": (64, 1),
}


def _time(fn, iters: int = 100, warmup: int = 10) -> float:
    """Median milliseconds of ``fn()``."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _optional_baselines(q, k, cos_full, sin_full):
    """Liger / flash-attn RoPE when installed: name -> callable (errors skip the baseline)."""
    out = {}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction  # type: ignore

        qc, kc = q.contiguous(), k.contiguous()  # Liger expects [b, h, s, d] contiguous
        out["liger"] = lambda: LigerRopeFunction.apply(qc, kc, cos_full, sin_full)
    except Exception:
        pass
    try:
        from flash_attn.layers.rotary import apply_rotary_emb  # type: ignore

        qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [b, s, h, d]
        half = cos_full.shape[-1] // 2
        c, s = cos_full[0, :, :half].contiguous(), sin_full[0, :, :half].contiguous()

        def fa():
            apply_rotary_emb(qs, c, s)
            apply_rotary_emb(ks, c, s)

        out["flash_attn"] = fa
    except Exception:
        pass
    return out


def bench_case(model: str, phase: str, dtype_name: str, iters: int) -> dict:
    import torch

    import posrewrite.ops  # noqa: F401
    from posrewrite.math.rope import default_inv_freq

    ops = torch.ops.posrewrite
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    hq, hk, d = MODELS[model]
    batch, seq = PHASES[phase]
    dev = "cuda"
    # HF layout: [b, h, s, d] views of [b, s, h, d] projections
    q = torch.randn(batch, seq, hq, d, device=dev, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq, hk, d, device=dev, dtype=dtype).transpose(1, 2)
    pos = (torch.arange(seq, device=dev) + (4000 if phase == "decode" else 0))[None].expand(batch, -1).contiguous()
    inv = torch.from_numpy(default_inv_freq(500000.0, d)).to(dev)
    angles = pos[..., None].float() * inv
    cos_h, sin_h = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # [b, 1, s, d/2]
    cos_full = torch.cat((cos_h, cos_h), -1)[:, 0]  # [b, s, d] as HF makes it
    sin_full = torch.cat((sin_h, sin_h), -1)[:, 0]

    elt = q.element_size()
    qk_bytes = (q.numel() + k.numel()) * elt
    moved = 2 * qk_bytes + 2 * cos_h.numel() * elt  # read + write q, k; read cos, sin
    src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def eager():
        c, s = cos_full.unsqueeze(1), sin_full.unsqueeze(1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    variants = {
        "copy": lambda: dst.copy_(src),
        "fused": lambda: ops.rope_qk(q, k, cos_h, sin_h, False, d, 2),
        "fused_freqs": lambda: ops.rope_qk_freqs(q, k, pos, inv, 1.0, False, 2),
        "eager": eager,
    }
    try:
        compiled = torch.compile(eager)
        compiled()
        variants["compiled"] = compiled
    except Exception as e:  # pragma: no cover - depends on the install
        print(f"  torch.compile unavailable: {e}", file=sys.stderr)
    variants.update(_optional_baselines(q, k, cos_full, sin_full))

    # correctness of the fused kernel against eager before timing
    fq, fk = variants["fused"]()
    eq, ek = eager()
    err = max((fq.float() - eq.float()).abs().max().item(), (fk.float() - ek.float()).abs().max().item())

    row = {"model": model, "phase": phase, "dtype": dtype_name, "batch": batch, "seq": seq, "bytes": moved,
           "max_err_vs_eager": err}
    for name, fn in variants.items():
        try:
            ms = _time(fn, iters=iters)
        except Exception as e:  # a baseline failing must not stop the run
            print(f"  {name} failed: {e}", file=sys.stderr)
            continue
        row[f"{name}_ms"] = ms
        row[f"{name}_GBps"] = moved / (ms * 1e-3) / 1e9
    if "fused_GBps" in row and "copy_GBps" in row:
        row["fused_vs_copy"] = row["fused_GBps"] / row["copy_GBps"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("rope_kernel_gpu: torch is not installed; nothing to measure.")
        return 0
    if not torch.cuda.is_available():
        print("rope_kernel_gpu: no CUDA device available; this benchmark needs a GPU. Nothing measured.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("rope_kernel_gpu: triton is not installed; the fused op would fall back to torch. Nothing measured.")
        return 0

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for model in args.models.split(","):
        for phase in args.phases.split(","):
            for dtype in args.dtypes.split(","):
                row = bench_case(model, phase, dtype, args.iters)
                rows.append(row)
                names = [k[:-5] for k in row if k.endswith("_GBps")]
                bw = "  ".join(f"{n} {row[n + '_GBps']:7.1f}" for n in names)
                share = row.get("fused_vs_copy")
                print(f"{model:>4} {phase:<9} {dtype}  GB/s: {bw}  | fused/copy {share:.0%}  "
                      f"err {row['max_err_vs_eager']:.2e}" if share is not None else bw)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shares = [r["fused_vs_copy"] for r in rows if "fused_vs_copy" in r]
    if shares:
        print(f"fused kernel: median {statistics.median(shares):.0%} of copy bandwidth (goal >= 85%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
