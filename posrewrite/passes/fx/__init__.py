"""fx passes over ATen graphs from `torch.export.export`: RoPE/ALiBi detection, rescaling, fp32-safe
positions and fusion into the `posrewrite::rope*` custom ops."""
