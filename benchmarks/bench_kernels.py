"""Bandwidth of labkit's Triton kernels on a CUDA GPU, against PyTorch eager and torch.compile,
and the time of one decode step of a LLaMA-7B-shaped layer stack (random weights) in fp16 and W4A16.

    python benchmarks/bench_kernels.py                 # everything (needs a CUDA GPU)
    python benchmarks/bench_kernels.py --quick         # fewer shapes, 4 layers
    python benchmarks/bench_kernels.py --no-compile    # skip torch.compile baselines
    python benchmarks/bench_kernels.py --smoke         # tiny shapes on CPU (Triton interpreter): checks the
                                                       # script runs; its timings mean nothing

These kernels move many bytes and do few flops, so the figure of merit is achieved bandwidth:
GB/s = (bytes the op must read + bytes it must write) / time, compared with the GPU's peak (a
table by device name) and with a measured device-to-device copy (what is reachable in practice).
A naive implementation that moves more bytes than necessary still counts only the necessary ones.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel launch

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from labkit import kernels as K  # noqa: E402

# Peak DRAM bandwidth in GB/s (vendor datasheets), matched by substring of torch.cuda.get_device_name,
# most specific first ("A100" before "A10", "L40S" before "L4").
PEAK_GBPS = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864),
    ("L4", 300), ("A10G", 600), ("A10", 600), ("T4", 320), ("V100", 900), ("RTX 4090", 1008),
    ("RTX 3090", 936), ("A6000", 768),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device, rep_ms: int = 100) -> float:
    """Median time of fn() in milliseconds (triton.testing.do_bench on CUDA: it runs fn for about
    rep_ms milliseconds and flushes the L2 cache before each call)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - start) / 2 * 1e3


def peak_bandwidth(device) -> tuple[float | None, float]:
    """(table peak GB/s or None, measured copy GB/s)."""
    if device.type != "cuda":
        return None, float("nan")
    name = torch.cuda.get_device_name(device)
    table = next((gbps for key, gbps in PEAK_GBPS if key in name), None)
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return table, 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class Report:
    def __init__(self, peak, copy):
        self.ref = peak or copy
        self.rows = []
        print(f"{'kernel':<44} {'impl':<14} {'time':>10} {'GB/s':>8} {'% peak':>7} {'speed-up':>9}")

    def add(self, kernel, impl, ms, nbytes, baseline_ms=None):
        gbps = nbytes / (ms * 1e-3) / 1e9
        pct = f"{100 * gbps / self.ref:6.1f}%" if self.ref and self.ref == self.ref else "    n/a"
        speed = f"{baseline_ms / ms:8.2f}x" if baseline_ms else ""
        print(f"{kernel:<44} {impl:<14} {ms * 1e3:8.1f}us {gbps:8.1f} {pct:>7} {speed:>9}")
        self.rows.append(dict(kernel=kernel, impl=impl, ms=ms, gbps=gbps))


def compiled(fn, enabled):
    if not enabled:
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as err:  # noqa: BLE001 -- a missing compiler toolchain is not fatal here
        print(f"  (torch.compile unavailable: {err})")
        return None


def compare(report, name, nbytes, device, triton_fn, eager_fn, compile_fn=None):
    """Time the Triton kernel, eager PyTorch and (if given) torch.compile of the eager code."""
    eager = bench_ms(eager_fn, device)
    report.add(name, "torch eager", eager, nbytes)
    if compile_fn is not None:
        try:
            compile_fn()  # compile outside the timing
            report.add(name, "torch.compile", bench_ms(compile_fn, device), nbytes, eager)
        except Exception as err:  # noqa: BLE001
            print(f"  (torch.compile failed for {name}: {type(err).__name__}: {str(err)[:120]})")
    report.add(name, "triton", bench_ms(triton_fn, device), nbytes, eager)


# --- the elementwise kernels --------------------------------------------------------------------------

def bench_elementwise(report, device, dtype, tokens, hidden, inter, heads, head_dim, use_compile):
    nb = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    r, w = torch.randn_like(x), torch.ones(hidden, dtype=dtype, device=device)
    comp = compiled(K.rms_norm_torch, use_compile)
    compare(report, f"rms_norm + residual [{tokens}x{hidden}]", 4 * x.numel() * nb, device,
            lambda: K.rms_norm(x, w, 1e-6, residual=r, backend="triton"),
            lambda: K.rms_norm_torch(x, w, 1e-6, r), comp and (lambda: comp(x, w, 1e-6, r)))

    gate_up = torch.randn(tokens, 2 * inter, dtype=dtype, device=device)
    eager = lambda: K.swiglu_torch(gate_up[:, :inter], gate_up[:, inter:])  # noqa: E731
    comp = compiled(K.swiglu_torch, use_compile)
    compare(report, f"silu_and_mul [{tokens}x{2 * inter}]", 3 * tokens * inter * nb, device,
            lambda: K.silu_and_mul(gate_up, backend="triton"), eager,
            comp and (lambda: comp(gate_up[:, :inter], gate_up[:, inter:])))

    seq = max(1, tokens // 8)
    q = torch.randn(8, heads, seq, head_dim, dtype=dtype, device=device)
    ang = torch.randn(8, seq, head_dim // 2, device=device)
    cos = torch.cat([ang.cos()] * 2, -1).to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(dtype)
    comp = compiled(K.rotary_torch, use_compile)
    compare(report, f"rotary [8x{heads}x{seq}x{head_dim}]", (2 * q.numel() + 2 * cos.numel()) * nb, device,
            lambda: K.rotary(q, cos, sin, backend="triton"), lambda: K.rotary_torch(q, cos, sin),
            comp and (lambda: comp(q, cos, sin)))


# --- W4A16 ---------------------------------------------------------------------------------------------

def random_w4(out_features, in_features, group_size, dtype, device):
    codes = torch.randint(0, 16, (out_features, in_features), device=device, dtype=torch.uint8)
    n_groups = in_features // group_size
    scales = (0.002 + 0.01 * torch.rand(out_features, n_groups, device=device)).to(dtype)
    zeros = torch.full((out_features, n_groups), 8.0, device=device, dtype=dtype)
    return K.w4a16_from_codes(codes, scales, zeros, group_size)


def bench_w4a16(report, device, dtype, shapes, rows_list, group_size, use_compile):
    nb = torch.tensor([], dtype=dtype).element_size()
    for (n, k) in shapes:
        qweight, scales, zeros = random_w4(n, k, group_size, dtype, device)
        dense = K.w4a16_dequantize(qweight, scales, zeros, group_size, dtype)  # [n, k]
        comp = compiled(K.w4a16_matmul_torch, use_compile)
        for m in rows_list:
            x = torch.randn(m, k, dtype=dtype, device=device)
            w4_bytes = qweight.numel() + 2 * scales.numel() * nb + (m * k + m * n) * nb
            name = f"w4a16 [{m}x{k}] @ [{k}x{n}]ᵀ g{group_size}"
            dense_ms = bench_ms(lambda: F.linear(x, dense), device)
            report.add(name, f"dense {str(dtype)[6:]}", dense_ms, n * k * nb + (m * k + m * n) * nb)
            compare(report, name, w4_bytes, device,
                    lambda: K.w4a16_matmul(x, qweight, scales, zeros, group_size, backend="triton"),
                    lambda: K.w4a16_matmul_torch(x, qweight, scales, zeros, group_size),
                    comp and (lambda: comp(x, qweight, scales, zeros, group_size)))
            print(f"  -> triton W4A16 vs dense {str(dtype)[6:]} matmul: "
                  f"{dense_ms / report.rows[-1]['ms']:.2f}x")


# --- paged attention -------------------------------------------------------------------------------------

def make_paged(batch, ctx, heads, kv_heads, head_dim, block_size, dtype, device):
    per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * per_seq
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    q = torch.randn(batch, heads, head_dim, dtype=dtype, device=device)
    tables = torch.randperm(num_blocks, device=device).view(batch, per_seq).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def bench_paged_attention(report, device, dtype, configs, block_size):
    nb = torch.tensor([], dtype=dtype).element_size()
    for batch, ctx, heads, kv_heads, head_dim in configs:
        q, k, v, tables, lens = make_paged(batch, ctx, heads, kv_heads, head_dim, block_size, dtype, device)
        nbytes = 2 * batch * ctx * kv_heads * head_dim * nb + 2 * q.numel() * nb
        name = f"paged attn b{batch} ctx{ctx} h{heads}/{kv_heads} d{head_dim}"
        # The eager baselines: the gathering reference, and SDPA on a contiguous (unpaged) cache.
        kc = k[tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
        vc = v[tables.long()].reshape(batch, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
        group = heads // kv_heads
        kc, vc = kc.repeat_interleave(group, 1), vc.repeat_interleave(group, 1)  # [batch, heads, ctx, d]
        sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc), device)
        report.add(name, "sdpa contig.", sdpa_ms, nbytes)
        if batch * ctx <= 64 * 1024:  # the reference loops over sequences in Python: keep it short
            ref_ms = bench_ms(lambda: K.paged_attention_decode_torch(q, k, v, tables, lens), device, rep_ms=50)
            report.add(name, "torch ref", ref_ms, nbytes)
        report.add(name, "triton", bench_ms(lambda: K.paged_attention_decode(
            q, k, v, tables, lens, backend="triton", check_values=False), device), nbytes, sdpa_ms)


# --- one decode step of a LLaMA-7B-shaped stack ----------------------------------------------------------

def make_stack(layers, hidden, heads, kv_heads, inter, quant, group_size, dtype, device):
    head_dim = hidden // heads
    out = []
    for _ in range(layers):
        def lin(n, k):
            if quant:
                return random_w4(n, k, group_size, dtype, device)
            return ((torch.rand(n, k, device=device, dtype=dtype) - 0.5) * (2 / math.sqrt(k)),)
        out.append(dict(
            qkv=lin((heads + 2 * kv_heads) * head_dim, hidden), o=lin(hidden, hidden),
            gate_up=lin(2 * inter, hidden), down=lin(hidden, inter),
            ln1=torch.ones(hidden, dtype=dtype, device=device), ln2=torch.ones(hidden, dtype=dtype, device=device),
        ))
    return out


def decode_step(stack, x, caches, tables, lens, slots, cos, sin, cfg, backend, group_size):
    """One token for each of B sequences through the stack. x: [B, hidden]; caches: per layer (k, v)."""
    B, hidden = x.shape
    heads, kv_heads = cfg["heads"], cfg["kv_heads"]
    head_dim = hidden // heads

    def linear(t, w):
        if len(w) == 1:
            return F.linear(t, w[0])
        return K.w4a16_matmul(t, *w, group_size, backend=backend)

    h, residual = x, None
    for layer, (kc, vc) in zip(stack, caches):
        if residual is None:
            residual, t = h, K.rms_norm(h, layer["ln1"], 1e-6, backend=backend)
        else:
            t, residual = K.rms_norm(h, layer["ln1"], 1e-6, residual=residual, backend=backend)
        q, k, v = linear(t, layer["qkv"]).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q = K.rotary(q.reshape(B, heads, 1, head_dim).contiguous(), cos, sin, backend=backend)
        k = K.rotary(k.reshape(B, kv_heads, 1, head_dim).contiguous(), cos, sin, backend=backend)
        kc.view(-1, kv_heads, head_dim)[slots] = k[:, :, 0]  # write the new token's K/V
        vc.view(-1, kv_heads, head_dim)[slots] = v.reshape(B, kv_heads, head_dim)
        o = K.paged_attention_decode(q[:, :, 0], kc, vc, tables, lens, backend=backend, check_values=False)
        h = linear(o.reshape(B, hidden), layer["o"])
        t, residual = K.rms_norm(h, layer["ln2"], 1e-6, residual=residual, backend=backend)
        h = linear(K.silu_and_mul(linear(t, layer["gate_up"]), backend=backend), layer["down"])
    return h + residual


def bench_decode(report, device, dtype, layers, batch, ctx, cfg, group_size, block_size, cuda_graph):
    hidden, heads, kv_heads, inter = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["inter"]
    head_dim = hidden // heads
    nb = torch.tensor([], dtype=dtype).element_size()
    per_seq = math.ceil((ctx + 1) / block_size)
    caches = [tuple(torch.zeros(batch * per_seq, block_size, kv_heads, head_dim, dtype=dtype, device=device)
                    for _ in range(2)) for _ in range(layers)]
    tables = torch.arange(batch * per_seq, device=device, dtype=torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device=device)
    slots = (tables[:, ctx // block_size].long() * block_size + ctx % block_size)  # [B]
    ang = torch.full((batch, 1, head_dim // 2), float(ctx), device=device)
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    x = torch.randn(batch, hidden, dtype=dtype, device=device) * 0.1
    kv_bytes = layers * 2 * batch * (ctx + 1) * kv_heads * head_dim * nb
    for quant in (False, True):
        stack = make_stack(layers, hidden, heads, kv_heads, inter, quant, group_size, dtype, device)
        w_bytes = sum(t.numel() * t.element_size() for layer in stack for v in layer.values()
                      for t in (v if isinstance(v, tuple) else (v,)))
        label = "W4A16" if quant else str(dtype)[6:]
        name = f"decode {layers}L b{batch} ctx{ctx} {label}"
        for backend in ("triton",) + (("torch",) if not quant else ()):
            def fn(backend=backend):
                return decode_step(stack, x, caches, tables, lens, slots, cos, sin, cfg, backend, group_size)
            ms = bench_ms(fn, device, rep_ms=300)
            report.add(name, f"{backend} kernels", ms, w_bytes + kv_bytes)
            if cuda_graph and device.type == "cuda" and backend == "triton":
                try:
                    fn()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    report.add(name, "triton+graph", bench_ms(graph.replay, device, rep_ms=300), w_bytes + kv_bytes, ms)
                except Exception as err:  # noqa: BLE001
                    print(f"  (CUDA graph capture failed: {type(err).__name__}: {str(err)[:120]})")
        print(f"  -> weights {w_bytes / 1e9:.2f} GB + KV cache read {kv_bytes / 1e9:.3f} GB per step")
        del stack
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shapes; a 4-layer stack")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode timing")
    p.add_argument("--layers", type=int, default=None, help="decoder layers in the decode benchmark (default 32)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        dtype = torch.float16
        if not K.triton_interpreted():
            sys.exit("--smoke needs TRITON_INTERPRET=1 before the first kernel launch (the script sets it).")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py measures GPU memory bandwidth and needs a CUDA GPU (none found). "
                     "Run it on a CUDA machine, or pass --smoke to check the script on CPU.")
        device = torch.device("cuda")
        dtype = getattr(torch, args.dtype)
    if not K.triton_available():
        sys.exit("bench_kernels.py needs triton: pip install triton")

    table, copy = peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter smoke test)"
    print(f"device: {name}; peak {table or 'unknown'} GB/s (datasheet), device copy {copy:.0f} GB/s (measured); "
          f"% peak below is of the {'datasheet peak' if table else 'measured copy'}. torch {torch.__version__}")
    report = Report(table, copy)
    use_compile = not args.no_compile and not args.smoke
    llama7b = dict(hidden=4096, heads=32, kv_heads=32, inter=11008)

    if args.smoke:
        bench_elementwise(report, device, dtype, 16, 64, 96, 4, 16, False)
        bench_w4a16(report, device, dtype, [(48, 64)], [1], 32, False)
        bench_paged_attention(report, device, dtype, [(2, 40, 4, 2, 16)], 16)
        bench_decode(report, device, dtype, 2, 2, 20, dict(hidden=64, heads=4, kv_heads=2, inter=96), 32, 16, False)
        return report
    tokens = 4096 if args.quick else 8192
    bench_elementwise(report, device, dtype, tokens, 4096, 11008, 32, 128, use_compile)
    shapes = [(4096, 4096), (11008, 4096)]  # [out, in]: q/k/v/o_proj, up/gate_proj
    if not args.quick:
        shapes += [(12288, 4096), (22016, 4096), (4096, 11008)]  # merged qkv, merged gate_up, down_proj
    bench_w4a16(report, device, dtype, shapes, [1, 16] if args.quick else [1, 4, 16, 64], 128, use_compile)
    attn = [(1, 4096, 32, 32, 128), (32, 1024, 32, 32, 128), (32, 1024, 32, 8, 128)]
    if not args.quick:
        attn += [(8, 4096, 32, 32, 128), (64, 512, 32, 8, 128), (128, 256, 32, 32, 128)]
    bench_paged_attention(report, device, dtype, attn, 16)
    layers = args.layers or (4 if args.quick else 32)
    free, _ = torch.cuda.mem_get_info()
    per_layer = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # fp16 bytes per layer
    if layers * per_layer > 0.8 * free:
        layers = max(1, int(0.8 * free // per_layer))
        print(f"  (decode stack reduced to {layers} layers to fit in {free / 1e9:.1f} GB free)")
    for batch, ctx in ([(1, 512), (16, 512)] if args.quick else [(1, 512), (1, 2048), (16, 512), (32, 1024)]):
        kv = layers * 2 * batch * (ctx + 1) * 4096 * 2  # K and V of every layer, fp16
        if layers * per_layer + kv > 0.8 * free:
            print(f"  (skipping decode b{batch} ctx{ctx}: {(layers * per_layer + kv) / 1e9:.1f} GB does not fit)")
            continue
        bench_decode(report, device, dtype, layers, batch, ctx, llama7b, 128, 16, not args.no_graph)
    return report


if __name__ == "__main__":
    main()
