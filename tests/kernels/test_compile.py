"""Compile the Triton kernels for an H100 (sm_90) without a GPU.

The interpreter runs kernels as numpy code, so it cannot see errors that only the GPU compiler
raises (loop-carried type changes, unsupported ops, constexpr misuse, shared memory over the
limit). Triton can lower a kernel all the way to a cubin for a named target with no device present
(its wheel ships ptxas), so on CPU-only machines this test builds the kernels at the block sizes
the launchers pick on a GPU and checks each fits in an H100's shared memory. On a GPU machine the
other kernel tests run the kernels for real, so this one is skipped there.

It runs in a child process: the compiler is unavailable once this pytest process has set
TRITON_INTERPRET=1 for the interpreter tests.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90


def _compile_all():
    """Child process: compile a representative set of kernels for sm_90, one JSON line each."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import imagebert_ds.kernels._flash_attention_kernels as AK
    import imagebert_ds.kernels.flash_attention as A
    import imagebert_ds.kernels.fused_linear_cross_entropy as M
    import imagebert_ds.kernels.layernorm as LN

    target = GPUTarget("cuda", 90, 32)
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

    def build(label, lazy, types, constexprs, num_warps, num_stages=1):
        fn = lazy.kernel()
        sig = {name: ("constexpr" if name in constexprs else types(name)) for name in fn.arg_names}
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                               options=dict(num_warps=num_warps, num_stages=num_stages))
            print(json.dumps({"kernel": label, "ok": True, "shared": c.metadata.shared}), flush=True)
        except Exception as e:  # report every failure, not just the first
            print(json.dumps({"kernel": label, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)

    def attn_types(dt):
        def types(n):
            if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                return "*" + ty[dt]
            if n in ("LSE", "DELTA"):
                return "*fp32"
            if n in ("KMASK", "KEEP"):
                return "*i8"
            if n in ("KV_END", "CU_SEQLENS"):
                return "*i32"
            if n in ("qk_scale", "sm_scale", "p_drop"):
                return "fp32"
            return "i32"
        return types

    # (dtype, head dim, varlen, key mask, dropout): the model's bf16 / D=64 in both forms, with and
    # without dropout (the shipped configs train with it), the biggest tiles (fp16, D=128, also with
    # dropout), and the fp32 "ieee" path
    for dt, D, varlen, kmask, drop in [
            (torch.bfloat16, 64, False, True, False), (torch.bfloat16, 64, True, False, False),
            (torch.float16, 128, False, False, False), (torch.float32, 32, False, True, False),
            (torch.bfloat16, 64, False, True, True), (torch.bfloat16, 64, True, False, True),
            (torch.float16, 128, False, False, True)]:
        for name, kernel, bwd in (("fwd", AK._attn_fwd_kernel, False), ("dkdv", AK._attn_bwd_dkdv_kernel, True),
                                  ("dq", AK._attn_bwd_dq_kernel, True)):
            cfg = A._block_config(D, dt, bwd, drop)
            build(f"attn_{name}_{ty[dt]}_D{D}_varlen{int(varlen)}_mask{int(kmask)}_dropout{int(drop)}", kernel,
                  attn_types(dt), dict(HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], VARLEN=varlen,
                                       HAS_KMASK=kmask, DROPOUT=drop, UPCAST=False),
                  cfg["num_warps"], cfg["num_stages"])
    build("attn_bwd_preprocess_bf16_D64", AK._attn_bwd_preprocess_kernel, attn_types(torch.bfloat16),
          dict(HEAD_DIM=64, BLOCK_M=64, VARLEN=True), 4)
    build("attn_dropout_mask", AK._dropout_mask_kernel, attn_types(torch.bfloat16), dict(BLOCK_M=64, BLOCK_N=64), 4)

    block, warps = LN._settings(768)
    ln_types = lambda n: ("*fp32" if n in ("MEAN", "RSTD", "DW_PART", "DB_PART") else  # noqa: E731
                          "*bf16" if n.isupper() else "fp32" if n == "eps" else "i32")
    build("layernorm_fwd_bf16_C768", LN._add_layernorm_fwd_kernel, ln_types, dict(HAS_RESIDUAL=True, BLOCK_C=block), warps)
    build("layernorm_bwd_bf16_C768", LN._add_layernorm_bwd_kernel, ln_types, dict(HAS_RESIDUAL=True, BLOCK_C=block), warps)

    block_v = M._block_v(30522)
    ce_types = lambda n: {"LOGITS": "*bf16", "LABELS": "*i64", "LOSS": "*fp32", "inv_n": "fp32"}.get(n, "i32")  # noqa: E731
    build("ce_bf16_V30522", M._ce_fwd_bwd_kernel, ce_types, dict(BLOCK_V=block_v), 32)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="a GPU is present: the other kernel tests compile and run the kernels")
def test_kernels_compile_for_h100():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 26, out.stdout + out.stderr[-2000:]
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']}: {r['error']}" for r in failed)
    too_big = [r for r in results if r["shared"] > H100_SMEM]
    assert not too_big, f"shared memory over the H100 limit: {too_big}"


if __name__ == "__main__":
    _compile_all()
