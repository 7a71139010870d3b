"""The single-process DeepSeek-V3 model that every distributed layout reproduces.

load.load_model builds a (partial) Transformer; transformer.Transformer exposes the stage API
(embed, forward_layers, logits, mtp_logits, new_cache, moe_layers). Nothing is imported here
so that `import ds3dist.model.dispatch` stays light.
"""
