"""Weight-only post-training quantization: RTN and GPTQ quantizers, dense bit packing, packed
linear layers, per-layer sensitivities (CMPQ, PMPQ, TDMPQ) and budgeted bit allocation."""

from optlab.core.models import register_loader
from optlab.quant.storage import MANIFEST, load_quantized

# load_model(folder) of a quantized folder or run rebuilds the packed layers through this.
register_loader(MANIFEST, load_quantized)
