"""Glue between deltatune and the tools people already use: transformers' ``Trainer``, TRL, HF peft
(:mod:`.peft_identity`), adapter model cards (:mod:`.model_card`) and llama.cpp (:mod:`.gguf_lora`).

The core imports only :mod:`.peft_identity` (which needs nothing beyond peft, and only when peft is
installed); the GGUF writer is loaded by the ``export`` command alone.
"""
