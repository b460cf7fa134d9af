"""The one registry of model shapes used by tests and benchmarks.

A model here is a folder holding a HuggingFace `config.json`, a word-level tokenizer and, for the
tiny CPU model, random weights, built locally: nothing is downloaded. Real shapes run with vLLM's
`load_format="dummy"`, whose near-tied logits make restored bytes and logprobs, not sampled tokens,
the thing to compare.

    python -m bench.models tiny-llama /tmp/tiny-llama     # write one model's folder, print its path
    python -m bench.models                                # list the models
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    extra: dict = field(default_factory=dict)
    #: "random": write seeded random weights (small models, CPU tests); "dummy": config only,
    #: start vLLM with load_format="dummy".
    weights: str = "dummy"
    dtype: str = "bfloat16"

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V, every layer, every KV head."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def hf_config(self) -> dict:
        cfg = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = self.rope_scaling
        cfg.update(self.extra)
        return cfg

    def materialize(self, root: str | Path, seed: int = 0, *, folder: str | Path | None = None) -> Path:
        """Write the model folder `root/<name>` (or `folder` itself) (idempotent) and return its path."""
        path = Path(folder) if folder is not None else Path(root) / self.name
        cfg_file = path / "config.json"
        want = json.dumps({"spec": asdict(self), "seed": seed, "tokenizer": TOKENIZER_FORMAT}, sort_keys=True)
        stamp = path / ".spec.json"
        if cfg_file.exists() and stamp.exists() and stamp.read_text() == want:
            return path
        path.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(json.dumps(self.hf_config(), indent=2))
        if self.weights == "random":
            _write_random_weights(self, path, seed)
        write_tokenizer(path, self.vocab_size)
        stamp.write_text(want)
        return path


#: Bumped whenever write_tokenizer's output changes (model folders are rebuilt then).
TOKENIZER_FORMAT = 1


def write_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` entries: ids 0..n-2 are the words "w0".."w<n-2>",
    the last is "<unk>"; words are split on whitespace and joined with one space.

    Every token sequence decodes to text that encodes back to the same ids, so vLLM's benchmark
    client (which draws random ids, decodes them and sends text) produces prompts with exactly the
    prefixes it meant to share, and no tokenizer has to be downloaded. No BOS/EOS tokens: the
    server adds nothing to a prompt.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
        "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}, indent=2))


def _write_random_weights(spec: ModelSpec, path: Path, seed: int) -> None:
    """Seeded normal(0, 0.02) weights with the Llama parameter names (Mistral's too; Gemma 3 adds
    its extra norms, and ties the output embedding where its config says so), as one safetensors file.

    Random but not tiny weights keep the logits well separated, so greedy tokens are a meaningful
    comparison on CPU (vLLM's dummy weights give nearly tied logits).
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    gemma = spec.model_type.startswith("gemma")
    cfg = spec.hf_config()

    def norm(n: int) -> torch.Tensor:  # the identity: Gemma's RMSNorm scales by (1 + weight)
        return (torch.zeros if gemma else torch.ones)(n, dtype=dt)

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rnd(spec.vocab_size, h),
        "model.norm.weight": norm(h),
    }
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = rnd(spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        if gemma:
            t[p + "pre_feedforward_layernorm.weight"] = norm(h)
            t[p + "post_feedforward_layernorm.weight"] = norm(h)
            t[p + "self_attn.q_norm.weight"] = norm(spec.head_dim)
            t[p + "self_attn.k_norm.weight"] = norm(spec.head_dim)
        t[p + "self_attn.q_proj.weight"] = rnd(q, h)
        t[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        t[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        t[p + "self_attn.o_proj.weight"] = rnd(h, q)
        t[p + "mlp.gate_proj.weight"] = rnd(spec.intermediate_size, h)
        t[p + "mlp.up_proj.weight"] = rnd(spec.intermediate_size, h)
        t[p + "mlp.down_proj.weight"] = rnd(h, spec.intermediate_size)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # CPU tests and the CPU demo: 2 layers, fp32, head_dim 32 (a size the CPU attention supports).
        ModelSpec(
            name="tiny-llama",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=32000,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            weights="random",
            dtype="float32",
        ),
        # Sliding-window attention on every layer (Mistral 7B v0.1 style): one KV cache group whose
        # blocks before the window are freed. The window (80 tokens) is shorter than the test prompts.
        ModelSpec(
            name="tiny-mistral-swa",
            architecture="MistralForCausalLM",
            model_type="mistral",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=32000,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            extra={"sliding_window": 80},
            weights="random",
            dtype="float32",
        ),
        # Gemma 3 style: sliding-window and global layers interleaved (two KV cache groups under vLLM's
        # hybrid KV cache manager; one full-attention group with it off). Same KV shape as tiny-llama.
        ModelSpec(
            name="tiny-gemma3",
            architecture="Gemma3ForCausalLM",
            model_type="gemma3_text",
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=32000,
            max_position_embeddings=8192,
            rope_theta=10000.0,
            extra={"sliding_window": 80, "layer_types": ["sliding_attention", "full_attention"],
                   "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
                   "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                   "final_logit_softcapping": None, "attn_logit_softcapping": None,
                   "rms_norm_eps": 1e-6},
            weights="random",
            dtype="float32",
        ),
        # A hybrid of Mamba-2 and attention layers (Nemotron-H style), config only: the connector
        # refuses it at startup (tests), before any weights would matter.
        ModelSpec(
            name="tiny-nemotron-h",
            architecture="NemotronHForCausalLM",
            model_type="nemotron_h",
            hidden_size=128,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            intermediate_size=256,
            vocab_size=32000,
            max_position_embeddings=8192,
            extra={"hybrid_override_pattern": "M*-", "mlp_hidden_act": "relu2", "ssm_state_size": 16,
                   "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1, "conv_kernel": 4,
                   "expand": 1, "chunk_size": 32, "layer_norm_epsilon": 1e-5},
            dtype="float32",
        ),
        ModelSpec(
            name="llama-3.1-8b",
            hidden_size=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA3_ROPE,
        ),
        ModelSpec(
            name="qwen3-8b",
            architecture="Qwen3ForCausalLM",
            model_type="qwen3",
            hidden_size=4096,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            intermediate_size=12288,
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            extra={"attention_bias": False, "rms_norm_eps": 1e-6},
        ),
    ]
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.models",
                                 description="Write a model folder (config, tokenizer, weights or none).")
    ap.add_argument("name", nargs="?", help=f"one of {sorted(MODELS)} (none: list them)")
    ap.add_argument("folder", nargs="?", help="where to write it (default: the benchmarks' model cache)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = ap.parse_args(argv)
    if args.name is None:
        for spec in MODELS.values():
            print(f"{spec.name:16} {spec.num_layers} layers, hidden {spec.hidden_size}, "
                  f"{'random weights' if spec.weights == 'random' else 'config only (load_format=dummy)'}")
        return 0
    if args.name not in MODELS:
        ap.error(f"unknown model {args.name!r}; known: {sorted(MODELS)}")
    from bench.configs import MODEL_CACHE

    print(MODELS[args.name].materialize(MODEL_CACHE, args.seed, folder=args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
