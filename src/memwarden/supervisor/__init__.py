"""``memwarden run -- CMD`` as a library: the supervisor, its job ledger and its brake."""
