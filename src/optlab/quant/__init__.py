"""Weight-only post-training quantization: RTN and GPTQ quantizers, dense bit packing, packed
linear layers, per-layer sensitivities (CMPQ, PMPQ, TDMPQ) and budgeted bit allocation."""
