"""generate_rationales: a teacher model writes rationales (and labels) for distillation data."""
