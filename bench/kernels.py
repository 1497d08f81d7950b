"""GPU microbenchmarks: copy-bandwidth and matmul ceilings, and the Triton paged-attention
kernels against them (decode: effective GB/s over the K/V bytes it must read; prefill: TFLOP/s,
beside torch SDPA on the same tokens laid out densely).

    python -m bench.kernels [--out results.json] [--quick]

Needs CUDA. Prints a table last; writes every number to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch
import triton
from triton.testing import do_bench

from replica.attention.triton_decode import default_num_splits, paged_decode_attention
from replica.attention.triton_kv_write import store_kv
from replica.attention.triton_prefill import paged_prefill_attention


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second (rotating over 2 buffer pairs)."""
    n = int(gib * 2**30) // 2
    src = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dst = [torch.empty_like(s) for s in src]
    i = itertools.count()

    def f():
        j = next(i) % 2
        dst[j].copy_(src[j])

    ms = do_bench(f, warmup=50, rep=300, return_mode="median")
    return 2 * n * 2 / (ms * 1e-3)


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _paged_setup(lens, page, hkv, dim, gen, sets=3):
    """Several cache/table sets so repeated runs don't just hit L2."""
    nblk = [math.ceil(n / page) for n in lens]
    num_blocks = sum(nblk)
    out = []
    for _ in range(sets):
        kc = torch.randn(num_blocks, page, hkv, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        vc = torch.randn_like(kc)
        perm = torch.randperm(num_blocks, device="cuda", generator=gen).int()
        bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32, device="cuda")
        i = 0
        for r, nb in enumerate(nblk):
            bt[r, :nb] = perm[i : i + nb]
            i += nb
        out.append((kc, vc, bt))
    return out


def bench_decode(results, quick: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [("qwen2.5-0.5b", 14, 2, 64), ("llama-3.2-1b", 32, 8, 64)]
    cases = [(256, "u100-2048"), (64, "u100-2048"), (16, 4096), (1, 8192)]
    variants = [(32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3)]
    if quick:
        variants = [(64, 4, 2), (128, 4, 3)]
    rows = []
    for (name, hq, hkv, dim), (bsz, ctx) in itertools.product(shapes, cases):
        if ctx == "u100-2048":
            lens = torch.randint(100, 2049, (bsz,), generator=torch.Generator().manual_seed(bsz)).tolist()
        else:
            lens = [ctx] * bsz
        for page in (128, 256):
            sets = _paged_setup(lens, page, hkv, dim, gen)
            ctx_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
            q = torch.randn(bsz, hq, dim, device="cuda", dtype=torch.bfloat16)
            kv_bytes = sum(lens) * hkv * dim * 2 * 2
            default_s = default_num_splits(bsz, hkv, torch.cuda.get_device_properties(0).multi_processor_count)
            for splits in sorted({1, default_s, min(32, 2 * default_s)}):
                for bn, w, st in variants:
                    if bn > page:
                        continue
                    it = itertools.count()

                    def f():
                        kc, vc, bt = sets[next(it) % len(sets)]
                        paged_decode_attention(
                            q, kc, vc, bt, ctx_t, 0.125, num_splits=splits, block_n=bn, num_warps=w, num_stages=st
                        )

                    try:
                        ms = do_bench(f, warmup=10, rep=50, return_mode="median")
                    except Exception as e:  # a variant that fails to compile is a result too
                        rows.append(
                            dict(
                                kind="decode",
                                model=name,
                                bsz=bsz,
                                ctx=ctx,
                                page=page,
                                splits=splits,
                                block_n=bn,
                                warps=w,
                                stages=st,
                                error=repr(e)[:200],
                            )
                        )
                        continue
                    rows.append(
                        dict(
                            kind="decode",
                            model=name,
                            bsz=bsz,
                            ctx=ctx,
                            page=page,
                            splits=splits,
                            block_n=bn,
                            warps=w,
                            stages=st,
                            us=ms * 1e3,
                            gbps=kv_bytes / (ms * 1e-3) / 1e9,
                            default_splits=default_s,
                        )
                    )
    results["decode"] = rows


def bench_prefill(results, quick: bool):
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for name, hq, hkv, dim in [("qwen2.5-0.5b", 14, 2, 64), ("llama-3.2-1b", 32, 8, 64)]:
        for chunks in ([(0, 1024)] * 4, [(0, 512)] * 4 + [(1536, 512)] * 4):
            page = 256
            lens = [s + n for s, n in chunks]
            ((kc, vc, bt),) = _paged_setup(lens, page, hkv, dim, gen, sets=1)
            q_lens = [n for _, n in chunks]
            cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device="cuda")
            sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
            q = torch.randn(sum(q_lens), hq, dim, device="cuda", dtype=torch.bfloat16)
            # causal FLOPs: 4 * D * sum over queries of visible keys
            flops = sum(4 * dim * hq * (n * s + n * (n + 1) / 2) for s, n in chunks)
            variants = [
                (64, 32, 4, 2),
                (64, 64, 4, 2),
                (64, 64, 4, 3),
                (64, 64, 8, 3),
                (128, 32, 4, 2),
                (128, 64, 4, 3),
                (128, 64, 8, 2),
                (128, 64, 8, 3),
            ]
            if quick:
                variants = [(64, 64, 4, 2), (128, 64, 8, 2)]
            for bm, bn, w, st in variants:
                try:
                    ms = do_bench(
                        lambda: paged_prefill_attention(
                            q,
                            kc,
                            vc,
                            bt,
                            cu,
                            sl,
                            max(q_lens),
                            0.125,
                            block_m=bm,
                            block_n=bn,
                            num_warps=w,
                            num_stages=st,
                        ),
                        warmup=20,
                        rep=100,
                        return_mode="median",
                    )
                except Exception as e:
                    rows.append(
                        dict(
                            kind="prefill",
                            model=name,
                            chunks=str(chunks[:1]) + f"x{len(chunks)}",
                            block_m=bm,
                            block_n=bn,
                            warps=w,
                            stages=st,
                            error=repr(e)[:200],
                        )
                    )
                    continue
                rows.append(
                    dict(
                        kind="prefill",
                        model=name,
                        chunks=f"{chunks[0]}..x{len(chunks)}",
                        block_m=bm,
                        block_n=bn,
                        warps=w,
                        stages=st,
                        us=ms * 1e3,
                        tflops=flops / (ms * 1e-3) / 1e12,
                    )
                )
            # Dense SDPA (flash) on the same queries with contiguous K/V, as a yardstick.
            if all(s == 0 for s, _ in chunks):
                n = q_lens[0]
                qd = q.view(len(chunks), n, hq, dim).transpose(1, 2)
                kd = torch.randn(len(chunks), hkv, n, dim, device="cuda", dtype=torch.bfloat16)
                vd = torch.randn_like(kd)
                ms = do_bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(
                        qd, kd, vd, is_causal=True, enable_gqa=True
                    ),
                    warmup=20,
                    rep=100,
                    return_mode="median",
                )
                rows.append(
                    dict(
                        kind="prefill-sdpa",
                        model=name,
                        chunks=f"{chunks[0]}..x{len(chunks)}",
                        us=ms * 1e3,
                        tflops=flops / (ms * 1e-3) / 1e12,
                    )
                )
    results["prefill"] = rows


def bench_store(results):
    rows = []
    for t in (256, 8192):
        key = torch.randn(t, 2, 64, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(4096, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        slots = torch.randperm(kc.shape[0] * 256, device="cuda")[:t]
        ms = do_bench(lambda: store_kv(key, key, kc, vc, slots), warmup=20, rep=100, return_mode="median")
        rows.append(dict(kind="store_kv", tokens=t, us=ms * 1e3, gbps=4 * key.numel() * 2 / (ms * 1e-3) / 1e9))
    results["store_kv"] = rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernel_results.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    results = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "triton": triton.__version__,
        "torch": torch.__version__,
    }
    results["copy_GBps"] = copy_bandwidth() / 1e9
    results["matmul_TFLOPs"] = matmul_tflops()
    print(
        f"{props.name}: copy {results['copy_GBps']:.0f} GB/s (read+write), bf16 matmul "
        f"{results['matmul_TFLOPs']:.0f} TFLOP/s",
        flush=True,
    )
    bench_store(results)
    bench_decode(results, args.quick)
    bench_prefill(results, args.quick)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)

    # Short table: best variant per case and the default variant's figure.
    print(f"\n{'case':58s} {'best us':>8s} {'GB/s|TF':>8s}  best variant")
    best: dict[str, dict] = {}
    for r in results["decode"] + results["prefill"]:
        if "us" not in r:
            continue
        key = (
            f"{r['kind']} {r['model']} b={r.get('bsz', '')} ctx={r.get('ctx', r.get('chunks'))}"
            f" page={r.get('page', 256)}"
        )
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for key, r in best.items():
        metric = r.get("gbps", r.get("tflops"))
        var = {k: r[k] for k in ("splits", "block_m", "block_n", "warps", "stages") if k in r}
        print(f"{key:58s} {r['us']:8.1f} {metric:8.1f}  {var}")
    for r in results["store_kv"]:
        print(f"store_kv tokens={r['tokens']}: {r['us']:.1f} us")
    print(f"copy ceiling {results['copy_GBps']:.0f} GB/s; matmul {results['matmul_TFLOPs']:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
