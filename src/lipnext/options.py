"""Option lists that the command line offers before torch is imported; the implementations
(``lipnext.certify``, ``lipnext.data``) and the config schema check against these same tuples."""

__all__ = ["RULES", "SPLITS"]

RULES = ("pairwise", "sqrt2")           # certificate rules of lipnext.certify
SPLITS = ("train", "val", "test")       # dataset splits of lipnext.data
