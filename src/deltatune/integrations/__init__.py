"""Glue between deltatune and the tools people already use: transformers' ``Trainer``, TRL and HF peft
(:mod:`.peft_identity`), adapter model cards (:mod:`.model_card`) and llama.cpp (:mod:`.gguf_lora`).

``model.py`` imports :mod:`.peft_identity` (which imports peft, when installed, only when a DeltaModel
is built) and :mod:`.model_card`; nothing here imports transformers' Trainer or TRL, and the GGUF writer
(the ``gguf`` package) is loaded by the ``export`` command alone.
"""
