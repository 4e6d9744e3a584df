"""The names transformers gives the parts of attention and feed-forward blocks, across architectures.

Names alone never decide a role: :mod:`.infer` accepts a name only where the module tree and the
shapes agree (a query, key and value side by side, a fused projection ``(H + 2 * KV) * d`` wide, an
up projection whose width the down projection reads back). The names are conventions shared by
many families, not a per-architecture table; lower-case, compared with a module's own name.
"""

from __future__ import annotations

QUERY = frozenset({"q_proj", "q", "query", "q_lin", "wq", "query_proj", "project_q", "to_q", "q_linear"})
KEY = frozenset({"k_proj", "k", "key", "k_lin", "wk", "key_proj", "project_k", "to_k", "k_linear"})
VALUE = frozenset({"v_proj", "v", "value", "v_lin", "wv", "value_proj", "project_v", "to_v", "v_linear"})
#: one projection computing query, key and value together (its output rows hold all three)
FUSED_QKV = frozenset({"c_attn", "qkv_proj", "query_key_value", "wqkv", "qkv", "w_pack", "in_proj", "qkv_linear",
                       "attn_qkv", "qkv_lin"})
#: attention output projections, most specific first (a block holding several takes the first)
OUTPUT = ("o_proj", "out_proj", "o", "out_lin", "wo", "c_proj", "attention_out", "dense", "proj", "out", "output",
          "o_linear", "out_linear")
#: path components that mark a cross-attention module (keys and values read the encoder's states)
CROSS = ("cross", "encoder_attn", "encdecattention", "src_attn")
#: feed-forward projections that gate (``act(gate(x)) * up(x)``): names containing these parts
GATE_PARTS = ("gate",)
GATE_NAMES = frozenset({"wi_0", "w1"})
#: the companion name that must sit beside a ``GATE_NAMES`` entry for it to be a gate (T5's wi_0/wi_1, w1/w3)
GATE_PARTNER = {"wi_0": "wi_1", "w1": "w3"}
#: parameter names of a forward that receives a block's residual input besides its hidden states
RESIDUAL_ARGS = ("input_tensor", "residual", "input_states")
