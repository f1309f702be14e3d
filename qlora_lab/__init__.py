"""QLoRA Lab: declarative LoRA/QLoRA fine-tuning experiments that measure what each choice bought you."""

__version__ = "0.1.0"
