"""The checkpoint layout transformers + bitsandbytes write for a ``load_in_4bit`` model (one
``Linear4bit``'s tensors), built from the s.11 ops: shared by tests/test_nf4.py and
tests/test_checkpoint_damage.py (both compare it with bitsandbytes' own where it is installed)."""

import json

import torch

from quantkernels import _ops as O
from quantkernels import reference as R


def bnb4_layout(name, w, qt, bs, dq, bias=None):
    """The tensors transformers / bitsandbytes save for one Linear4bit, written from the s.11 ops."""
    N, K = w.shape
    packed, absmax = O.quantize_4bit(w, qt, bs)
    st = {"quant_type": qt, "blocksize": bs, "dtype": "float32", "shape": [N, K]}
    sd = {f"{name}.weight": packed.reshape(-1, 1), f"{name}.weight.quant_map": R.CODES_4BIT[qt].clone()}
    if dq:
        q, nested, offset = O.double_quantize_absmax(absmax)
        st.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(offset))
        sd.update({f"{name}.weight.absmax": q, f"{name}.weight.nested_absmax": nested,
                   f"{name}.weight.nested_quant_map": R.DYNAMIC_CODE.clone()})
    else:
        sd[f"{name}.weight.absmax"] = absmax
    sd[f"{name}.weight.quant_state.bitsandbytes__{qt}"] = torch.tensor(list(json.dumps(st).encode()), dtype=torch.uint8)
    if bias is not None:
        sd[f"{name}.bias"] = bias
    return sd
