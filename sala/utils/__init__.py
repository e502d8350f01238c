"""Small shared helpers (no model code)."""
