"""mmfast attention for HF transformers models: `attn_implementation="mmfast"`.

    import mmfast.integrations.transformers as mmfast_hf
    mmfast_hf.register()                       # once, before building or switching models
    model = AutoModelForCausalLM.from_config(config, attn_implementation="mmfast")
    # or: model.set_attn_implementation("mmfast")

The attention itself is mmfast.nn.transformers_attention (see its docstring: padding, packed
sequences, span_ids, KV-cache steps); mmfast's LLaVA uses it there for a transformers language model.
"""
from mmfast.nn.transformers_attention import NAME, attention_forward, padding_mask, register

__all__ = ["NAME", "attention_forward", "padding_mask", "register"]
