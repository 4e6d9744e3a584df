"""What building the first DeltaModel costs in a fresh process, with and without the peft identity.

    python -m bench.first_model_cost [--rounds 3]

Each round starts two fresh interpreters that import torch, transformers and deltatune, build a tiny Llama,
then time ``dt.get_delta_model`` once: normally (a ``peft.PeftModel`` subclass: peft is imported) and inside
``without_peft_identity()`` (what the ``deltatune`` command does). The two alternate, so load on a shared
machine hits both; the script prints each time and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import time, contextlib, torch, transformers as tf, deltatune as dt
from deltatune.integrations.peft_identity import without_peft_identity
cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = tf.LlamaForCausalLM(cfg)
scope = without_peft_identity() if {plain} else contextlib.nullcontext()
start = time.perf_counter()
with scope:
    dt.get_delta_model(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
print(time.perf_counter() - start)
"""


def first_model_seconds(plain: bool) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD.format(plain=plain)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    with_peft, plain = [], []
    for _ in range(rounds):
        with_peft.append(first_model_seconds(False))
        plain.append(first_model_seconds(True))
    print("first DeltaModel, peft identity (s):   ", " ".join(f"{t:.2f}" for t in with_peft))
    print("first DeltaModel, without_peft_identity:", " ".join(f"{t:.2f}" for t in plain))
    print(f"median ratio with / without: {statistics.median(w / p for w, p in zip(with_peft, plain)):.1f}x "
          f"(median saving {statistics.median(with_peft) - statistics.median(plain):.2f} s)")


if __name__ == "__main__":
    main()
