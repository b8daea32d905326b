"""The teacher cache: the frozen teacher's hidden states on every training view, computed once
(``cot2align cache-teacher``) and read back by the training DataLoader instead of running the
teacher at every step. ``store.py`` is the on-disk format and its reader; ``build.py`` runs the
teacher to write it; ``heads.py`` loads the only teacher weights a cached run needs (input
embedding and output head). The design is described in docs/teacher_cache.md."""
