"""Session stores: one module per backend behind :class:`~pyserv.stores.base.SessionStore`."""
