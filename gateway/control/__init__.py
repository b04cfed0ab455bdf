"""Feedback control: the pure per-route controller and (later) its state store."""
