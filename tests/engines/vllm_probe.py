"""Load one checkpoint in vLLM's CPU build and write down what vLLM made of it.

Runs in the vLLM venv (``tests/engines/vllm_venv.sh``), never in the project's; imports nothing of
nvfp4cal. The project-side test (``tests/engines/test_vllm.py``) compares the result with our reader.

    python vllm_probe.py CHECKPOINT_DIR OUT_DIR [--kv-cache-dtype fp8|auto]

vLLM's CPU platform has no NVFP4 kernel: vLLM's own pure-torch emulation linear kernel is
registered for it through the public registry, and for MoE layers its emulation experts class gets
a torch ``apply`` (its own runs Triton kernels that need CUDA). No vLLM file is changed.

Writes ``OUT_DIR/probe.json``:

- ``methods``: vLLM module name -> quant-method class (what vLLM decided per layer)
- ``checkpoint_tensors`` / ``consumed`` / ``unexpected`` / ``missing``: every tensor the loader read
  from the files, those a parameter's weight loader took, those none took, and vLLM parameters no
  checkpoint tensor filled (kv-cache scales excepted when the checkpoint has none)
- ``kv``: per attention layer its cache dtype and loaded k/v scales
- ``generated``: greedy token ids for fixed prompts
- ``build_error`` (exit code 3) instead, when vLLM refused to build the engine

and ``OUT_DIR/layers.safetensors``: per quantized linear ``M`` its weight dequantized by vLLM's
emulation (``M.w``, fp32), a fixed input ``M.x`` (fp32) and vLLM's output ``M.y`` for it; per MoE
layer ``M`` its experts dequantized (``M.w13``, ``M.w2``) and their output ``M.y`` for an input ``M.x``
routed as ``M.topk_ids`` / ``M.topk_weights``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

if os.environ.get("NVFP4CAL_PROBE_AS_AVX2") == "1":  # behave like a CPU without AVX-512/AMX (tests the FP8-KV refusal)
    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
from safetensors.torch import save_file  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [72, 101, 108, 108, 111, 44, 32, 119]]


def register_cpu_emulation() -> None:
    """NVFP4 on vLLM's CPU platform through vLLM's own emulation (linear) and a torch experts apply."""
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.fused_moe.experts import nvfp4_emulation_moe
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as oracle
    from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype
    from vllm.platforms import PlatformEnum

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")

    class CpuNvfp4EmulationExperts(nvfp4_emulation_moe.Nvfp4QuantizationEmulationTritonExperts):
        """vLLM's NVFP4 emulation experts with the same math in torch: activations quantize-dequantized
        with the layer's global input scale, experts dequantized ``e2m1 * fp8 * weight_scale_2``."""

        @staticmethod
        def is_supported_config(cls, moe_config, weight_key, activation_key, activation_format):
            if moe_config.is_lora_enabled or moe_config.has_bias:
                return False, "LoRA / expert biases are not emulated here"
            return True, None

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                  apply_router_weight_on_input):  # fmt: skip
            qc, dt = self.quant_config, hidden_states.dtype

            def qdq(a, gscale):
                return moe_kernel_quantize_input(
                    A=a, A_scale=gscale, quant_dtype="nvfp4", per_act_token_quant=False, quantization_emulation=True
                )[0]

            x = qdq(hidden_states, qc.a1_gscale)
            out = torch.zeros(hidden_states.shape, dtype=torch.float32)
            for e in topk_ids.unique().tolist():
                rows, slot = (topk_ids == e).nonzero(as_tuple=True)
                w13 = dequantize_to_dtype(w1[e], self.w1_scale_val[e], qc.g1_alphas[e], dt, swizzle=False)
                h = x[rows] @ w13.t()
                act = torch.empty(h.shape[0], self.adjust_N_for_activation(h.shape[1], activation), dtype=dt)
                self.activation(activation, act, h)
                w2e = dequantize_to_dtype(w2[e], self.w2_scale_val[e], qc.g2_alphas[e], dt, swizzle=False)
                y = qdq(act, qc.a2_gscale) @ w2e.t()
                weight = 1.0 if apply_router_weight_on_input else topk_weights[rows, slot, None].float()
                out.index_add_(0, rows, y.float() * weight)
            output.copy_(out.to(output.dtype))

    original = oracle.backend_to_kernel_cls

    def backend_to_kernel_cls(backend):
        if backend == oracle.NvFp4MoeBackend.EMULATION:
            return [CpuNvfp4EmulationExperts]
        return original(backend)

    oracle.backend_to_kernel_cls = backend_to_kernel_cls


class LoadTracker:
    """Records which checkpoint tensors the model's weight loaders consumed (vLLM checks only that
    parameters were filled, and only for unquantized models)."""

    def __init__(self):
        self.yielded: list[str] = []
        self.consumed: set[str] = set()
        self.filled: set[str] = set()
        self.params: dict[str, str] = {}  # parameter -> owning module's quant method, before post-processing
        self.current: str | None = None

    def install(self) -> None:
        from vllm.model_executor.model_loader import default_loader
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        tracker, original = self, default_loader.DefaultModelLoader.load_weights

        def load_weights(loader, model, model_config):
            names = {id(p): n for n, p in model.named_parameters()}
            modules = dict(model.named_modules())
            for n in names.values():
                owner = modules.get(n.rpartition(".")[0])
                tracker.params[n] = type(getattr(owner, "quant_method", None)).__name__
            for p in model.parameters():
                inner = getattr(p, "weight_loader", default_weight_loader)

                def wrapped(param, *args, _inner=inner, **kwargs):
                    if tracker.current is not None:
                        tracker.consumed.add(tracker.current)
                    tracker.filled.add(names.get(id(param), "?"))
                    return _inner(param, *args, **kwargs)

                p.weight_loader = wrapped
            get_all = loader.get_all_weights

            def get_all_weights(*a, **kw):
                for name, t in get_all(*a, **kw):
                    tracker.yielded.append(name)
                    tracker.current = name
                    yield name, t
                tracker.current = None

            loader.get_all_weights = get_all_weights
            return original(loader, model, model_config)

        default_loader.DefaultModelLoader.load_weights = load_weights


def layer_records(model) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(module -> quant method, tensors to compare, KV state) from the loaded vLLM model."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    methods, tensors, kv = {}, {}, {}
    gen = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if qm is None:
            continue
        methods[name] = type(qm).__name__
        if hasattr(m, "_k_scale") and hasattr(m, "kv_cache_dtype"):
            kv[name] = {
                "kv_cache_dtype": str(m.kv_cache_dtype),
                "k_scale": float(m._k_scale),
                "v_scale": float(m._v_scale),
            }
        if (
            getattr(m, "weight", None) is not None
            and m.weight.dtype == torch.uint8
            and hasattr(m, "weight_global_scale")
        ):
            w = dequantize_to_dtype(m.weight, m.weight_scale, m.weight_global_scale, torch.float32, swizzle=False)
            x = torch.randn(8, w.shape[1], generator=gen)
            tensors[f"{name}.w"], tensors[f"{name}.x"] = w, x
            tensors[f"{name}.y"] = qm.apply(m, x).float()
            tensors[f"{name}.input_global_scale"] = m.input_global_scale_inv.float().reshape(())  # 1 / input_scale
        if getattr(m, "w13_weight", None) is not None and m.w13_weight.dtype == torch.uint8:
            tensors[f"{name}.w13"] = dequantize_to_dtype(
                m.w13_weight, m.w13_weight_scale, m.w13_weight_scale_2, torch.float32, swizzle=False
            )
            tensors[f"{name}.w2"] = dequantize_to_dtype(
                m.w2_weight, m.w2_weight_scale, m.w2_weight_scale_2, torch.float32, swizzle=False
            )
            tensors[f"{name}.w13_input_global_scale"] = m.w13_input_scale.float().reshape(())  # 1 / input_scale
            tensors[f"{name}.w2_input_global_scale"] = m.w2_input_scale.float().reshape(())
            experts = getattr(getattr(qm, "moe_kernel", None), "fused_experts", None)
            if experts is not None:  # the experts' output for a fixed routing: token t -> experts t, t+1 (mod E)
                n_exp, hidden = m.w13_weight.shape[0], m.w2_weight.shape[1]
                x = torch.randn(2 * n_exp, hidden, generator=gen)
                ids = torch.stack([torch.arange(2 * n_exp) % n_exp, (torch.arange(2 * n_exp) + 1) % n_exp], 1)
                weights = torch.softmax(torch.randn(2 * n_exp, 2, generator=gen), -1)
                y = torch.empty_like(x)
                experts.apply(y, x, m.w13_weight, m.w2_weight, weights, ids, m.activation, n_exp,
                              None, None, None, None, None, None, False)  # fmt: skip
                tensors[f"{name}.x"], tensors[f"{name}.y"] = x, y
                tensors[f"{name}.topk_ids"], tensors[f"{name}.topk_weights"] = ids, weights
    return methods, tensors, kv


def build(ckpt: str, kv_cache_dtype: str):
    from vllm import LLM

    return LLM(
        model=ckpt,
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=4,
        dtype="bfloat16",
        kv_cache_dtype=kv_cache_dtype,
        seed=0,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--kv-cache-dtype", default="auto", help="fp8 for a checkpoint with FP8 KV scales, else auto")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import vllm
    from vllm import SamplingParams

    register_cpu_emulation()
    tracker = LoadTracker()
    tracker.install()
    result = {"vllm": vllm.__version__, "torch": torch.__version__, "kv_cache_dtype": args.kv_cache_dtype}
    try:
        llm = build(args.ckpt, args.kv_cache_dtype)
    except Exception as err:  # noqa: BLE001 - the caller decides (an FP8 KV cache is refused on some CPUs)
        traceback.print_exc()
        result["build_error"] = f"{type(err).__name__}: {err}"[-2000:]
        (out / "probe.json").write_text(json.dumps(result, indent=2))
        return 3
    methods, tensors, kv = llm.apply_model(layer_records)[0]
    result["methods"], result["kv"] = methods, kv
    result["checkpoint_tensors"] = sorted(set(tracker.yielded))
    result["consumed"] = sorted(tracker.consumed)
    result["unexpected"] = sorted(set(tracker.yielded) - tracker.consumed)
    unfilled = sorted(set(tracker.params) - tracker.filled)
    # a KV-cache method's scales default to 1.0 when the checkpoint has none (no FP8 KV)
    result["missing"] = [n for n in unfilled if not tracker.params[n].endswith("KVCacheMethod")]
    result["kv_scales_defaulted"] = [n for n in unfilled if tracker.params[n].endswith("KVCacheMethod")]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(max_tokens=8, temperature=0))
    result["generated"] = [list(o.outputs[0].token_ids) for o in outs]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "layers.safetensors"))
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
