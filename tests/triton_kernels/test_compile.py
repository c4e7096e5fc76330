"""Compile the kernels ahead of time for NVIDIA targets, on any machine (no GPU needed: Triton's front end,
LLVM and the bundled ptxas). Catches what the interpreter cannot: compiler-only errors, and default configs
whose shared memory would not fit the GPU."""
import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from klotski.triton_kernels.config import default_config  # noqa: E402
from klotski.triton_kernels.fused_moe_kernels import build_kernels  # noqa: E402

# (compute capability, shared memory per block in bytes): RTX 3090/4090-class (the tightest), H100.
# The largest default tiles (M 8192) go to both; the smallest and the combine kernel to H100 only (compiles are slow).
SMEM = {86: 99 * 1024, 90: 227 * 1024}
CASES = [(90, "bf16", 1), (90, "bf16", 8192), (86, "bf16", 8192), (86, "fp32", 8192)]
DTYPES = {"bf16": 2, "fp32": 4}


def compile_kernel(fn, signature, constants, target, **options):
    signature = dict(signature, **{name: "constexpr" for name in constants})
    try:
        return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", target, 32),
                              options=options)
    except RuntimeError as err:  # no CUDA backend tools in this Triton build
        if "ptxas" in str(err) and "not found" in str(err):
            pytest.skip(f"no ptxas: {err}")
        raise


def gemm_signatures(dt):
    p = f"*{dt}"
    ints = dict.fromkeys(["num_pairs", "num_rows_padded"], "i32")
    gemm1 = dict(x_ptr=p, w13_ptr=p, inter_ptr=p, sorted_ids_ptr="*i32", expert_ids_ptr="*i32", slots_ptr="*i32",
                 num_post_pad_ptr="*i32", **ints, inter_size="i32", hidden_size="i32", stride_xm="i32",
                 stride_ws="i32", stride_wn="i32", stride_wk="i32", stride_im="i32")
    gemm2 = dict(inter_ptr=p, w2_ptr=p, y_ptr="*fp32", topk_weights_ptr="*fp32", sorted_ids_ptr="*i32",
                 expert_ids_ptr="*i32", slots_ptr="*i32", num_post_pad_ptr="*i32", **ints, hidden_size="i32",
                 inter_size="i32", stride_im="i32", stride_ws="i32", stride_wn="i32", stride_wk="i32",
                 stride_ym="i32")
    return gemm1, gemm2


@pytest.mark.parametrize("target, dt, num_tokens", CASES, ids=[f"sm{t}-{d}-M{m}" for t, d, m in CASES])
def test_default_configs_compile_and_fit(target, dt, num_tokens):
    kernels = build_kernels(interpret=False)
    cfg = default_config(num_tokens, 8, 2, dtype_bytes=DTYPES[dt])
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    precision = "ieee" if dt == "fp32" else "tf32"
    gemm1_sig, gemm2_sig = gemm_signatures(dt)
    gemm1 = compile_kernel(kernels.gemm1_act, gemm1_sig,
                           dict(TOP_K=2, HAS_SLOTS=True, ACTIVATION=num_tokens % 2, UPCAST=False,
                                INPUT_PRECISION=precision, **blocks), target, **launch)
    gemm2 = compile_kernel(kernels.gemm2_weight, gemm2_sig,
                           dict(HAS_SLOTS=num_tokens > 1, UPCAST=False, INPUT_PRECISION=precision, **blocks),
                           target, **launch)
    compiled = {"gemm1_act": gemm1, "gemm2_weight": gemm2}
    if num_tokens == 1:
        compiled["combine"] = compile_kernel(
            kernels.combine,
            dict(y_ptr="*fp32", topk_ids_ptr="*i64", slots_ptr="*i32", out_ptr=f"*{dt}", num_tokens="i32",
                 hidden_size="i32"),
            dict(TOP_K=2, HAS_SLOTS=True, ACCUMULATE=True, BLOCK_T=4, BLOCK_H=1024), target, num_warps=4)
    for name, kernel in compiled.items():
        assert kernel.metadata.shared <= SMEM[target], f"{name} {cfg}: {kernel.metadata.shared} B shared memory"
