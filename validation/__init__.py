"""Validation: release products compared with references and truth, as metrics and figures."""
