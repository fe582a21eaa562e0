"""Learning algorithms (docs/design.md §7), each behind the contract of ``trainers/base.py``: capabilities
declared as data, ``start`` and ``train_epoch``; ``base.fit`` runs the epochs for all of them."""
