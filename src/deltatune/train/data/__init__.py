"""Data for training and evaluation: the built-in real data sets (``builtin``, ``readers``), local files
(``files``), resolving a run's three splits (``sources``) and turning rows into token ids (``encoding``)."""
