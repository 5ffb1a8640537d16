"""Tools that measure axmini: LoC-complexity of feature integrations (history and patch modes) and the report."""
