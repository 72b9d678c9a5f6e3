"""Human names for the columns lenskit writes (files keep the column names)."""

from __future__ import annotations

__all__ = ["METRIC_NAMES", "metric_name"]

METRIC_NAMES: dict[str, str] = {
    "kl_bits": "KL to the model's output (bits)",
    "ce_bits": "next-token cross-entropy (bits)",
    "entropy_bits": "entropy (bits)",
    "top1_agree": "top-1 agreement with the model",
    "kl_bits_per_byte": "KL to the model's output (bits per byte)",
    "ce_bits_per_byte": "next-token cross-entropy (bits per byte)",
    "entropy_bits_per_byte": "entropy (bits per byte)",
    "top1_prob": "top-1 probability",
    "entropy": "entropy (bits)",
    "kl_to_final": "KL to the model's output (bits)",
    "kl_to_final_bits": "KL to the model's output (bits)",
    "cross_entropy": "next-token cross-entropy (bits)",
    "cross_entropy_bits": "next-token cross-entropy (bits)",
    "target_prob": "target probability",
    "target_rank": "target rank (1 = top-1)",
    "logit_kl_bits": "logit lens",
    "tuned_kl_bits": "tuned lens",
}
_WORDS = {"kl": "KL", "js": "JS", "ce": "cross-entropy", "tv": "total variation"}


def metric_name(column: str) -> str:
    """A column's human name: ``kl_bits`` -> ``KL to the model's output (bits)``.

    Columns without a listed name read word by word (``js_bits`` -> ``JS (bits)``).
    """
    if column in METRIC_NAMES:
        return METRIC_NAMES[column]
    words = column.split("_")
    unit = " (bits)" if words[-1] == "bits" and len(words) > 1 else ""
    words = words[:-1] if unit else words
    return " ".join(_WORDS.get(w.lower(), w) for w in words) + unit
